"""What a message's bytes can be held in, shared by the SMTP layer (which spools them) and
mail authentication (which reads them)."""

from __future__ import annotations

import mmap

#: What a message can be read from: memory, or a spool file's read-only mmap.
Buffer = bytes | bytearray | mmap.mmap
