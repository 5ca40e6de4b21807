"""CLIP weights from elsewhere: verified downloads and the named remote-sensing backbones.

- download.py: verified downloads into a cache;
- backbones.py: the named remote-sensing CLIP backbones.
"""
