"""Offline builders of the embedded default: the shapes-world VLM and the shapes CLIP trainers.

Nothing in the runtime pipeline imports this package; it is how ``data/shapes-llava`` and
``data/shapes-clip`` were made (``python -m msae.embedded.vlm_v2``, ``python -m
msae.embedded.shapes_clip``). ``views`` holds the masked / blurred views both trainers share.
"""
