"""The guest image: kernel, initramfs and root file system every capsule boots.

Built from Debian packages only (`nestbox-agent image build`, `make image`) into the shared,
content-hashed image cache; see `layout.py` for the cache, `build.py` for the stages. What runs
inside the guest (PID 1, the initramfs script) is package data under `guest/`.
"""
