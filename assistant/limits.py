"""Input limits and defaults shared by every surface (CLI, app, server); kept free of heavy imports."""

#: longest question accepted, in characters
MAX_QUESTION_CHARS = 4000
#: largest image accepted, in pixels (checked from the header before decoding)
MAX_IMAGE_PIXELS = 64_000_000

#: what `ask`, the app and the server client ask when no question is given
DEFAULT_QUESTION = "Is there any anomaly in this image? If so, where is it and what does it look like?"
