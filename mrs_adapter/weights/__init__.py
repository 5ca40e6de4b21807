"""CLIP weights from elsewhere: verified downloads into a cache (download.py) and the named
remote-sensing CLIP backbones (backbones.py)."""
