"""UCX_TLS for tests of the nixl path over UCX's TCP transport (as between hosts without RDMA NICs). On a host with
GPUs, NIXL's UCX backend refuses to start without a CUDA transport ("Invalid UCX_TLS=tcp ...: NVIDIA GPU(s) are
present"; seen on the H200 machine), so there it is tcp,cuda_copy."""

import os

UCX_TCP = "tcp,cuda_copy" if os.path.exists("/dev/nvidiactl") else "tcp"
