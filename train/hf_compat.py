"""The transformers `Trainer` internals this project still relies on, in one place.

Everything else goes through public hooks (`TrainerCallback`, `TrainingArguments`, `Trainer.compute_loss`). What is
left: a Trainer that checkpoints only part of its model (stage 1 saves the expert and selector, not the frozen tower
and LLM) must replace the weights file the Trainer writes into each checkpoint and reads back on resume, and
transformers offers no public hook for either. `tests/test_hf_compat.py` checks that the methods below still exist with
these signatures and are still called where this module expects, so a transformers upgrade that changes them fails
there, loudly, instead of training on silently.
"""

from __future__ import annotations

#: the private `Trainer` methods `PartialCheckpoints` overrides, with their parameters, and the public method whose
#: body calls each (what the test checks against the installed transformers)
RELIED_ON = {
    "_save": (("self", "output_dir", "state_dict"), "save_model"),
    "_load_from_checkpoint": (("self", "resume_from_checkpoint", "model"), "train"),
}


class PartialCheckpoints:
    """Mix into a `Trainer` subclass whose checkpoints hold only part of the model.

    The subclass defines `save_part(folder, state_dict)` (state_dict: what DeepSpeed gathered, else None) and
    `load_part(folder, model)`; the optimizer, scheduler, RNG and trainer state stay the Trainer's own.
    """

    def _save(self, output_dir=None, state_dict=None):  # called by `Trainer.save_model`, inside each checkpoint
        if self.args.should_save:
            self.save_part(output_dir or self.args.output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):  # called by `Trainer.train` on resume
        self.load_part(resume_from_checkpoint, model or self.model)
