"""Training: stage 1 (the anomaly expert) and stage 2 (instruction tuning: LoRA, QLoRA or full).

Single process, one node:
    python -m train configs/train/debug_tiny.yaml
    python -m train stage2 configs/train/stage2_lora.yaml model.path=runs/s1/stage1/model lora.r=64
Several processes (CPU: gloo; GPU: NCCL), one node:
    torchrun --nproc_per_node 2 -m train configs/train/debug_tiny.yaml output_dir=runs/ddp
    deepspeed --num_gpus 8 --module train CONFIG trainer.deepspeed=configs/deepspeed/zero2.json
Multi-node (run on every node; a shared output_dir):
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 -m train CONFIG
    deepspeed --hostfile hosts.txt --master_addr HOST --module train CONFIG trainer.deepspeed=configs/deepspeed/zero3.json
Merge an adapter into a standalone checkpoint:
    python -m train.merge --adapter runs/x/stage2/adapter --out models/x
"""
