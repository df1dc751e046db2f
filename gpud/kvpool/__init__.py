"""The KV pool: gpud owns each GPU's KV-cache memory and lends it to engines in pages.

``ledger`` is the pure book-keeping; ``pool`` joins it to a page backend
(``cuda`` on a GPU, ``backend.MemfdBackend`` or none elsewhere); ``server``
lends pages over a Unix socket and ``client`` is the engine side of it;
``kvcached`` drives engines that run the kvcached library. This package
must never import CUDA at import time: gpud runs on machines without a GPU.
"""
