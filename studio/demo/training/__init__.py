"""Training the embedded demo model; `studio/demo/train.py` is the command, these modules are its parts."""
