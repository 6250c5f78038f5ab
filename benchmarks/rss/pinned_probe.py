"""What a page-locked buffer costs the host: torch's pin_memory=True against registered memory.

Prints, per buffer, the growth of the process's RssAnon, RssFile and RssShmem (MiB), then the
host-to-GPU rate of a 386 MiB copy from each kind (GPU machine: python3 benchmarks/rss/pinned_probe.py).
"""

import torch

MiB = 2**20


def memory():
    with open("/proc/self/status") as fh:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh
                if line.startswith(("RssAnon", "RssShmem", "RssFile"))}


def growth(before, after):
    return ", ".join(f"{k} +{(after[k] - before[k]) / MiB:.0f}" for k in after)


def rate(src, dst):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dst.copy_(src, non_blocking=True)
    start.record()
    dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return src.numel() / (start.elapsed_time(end) / 1e3) / 1e9


def main():
    torch.zeros(1, device="cuda")
    keep = []
    for mib in (7, 100, 386, 386, 600):
        before = memory()
        buf = torch.empty(mib * MiB, dtype=torch.uint8, pin_memory=True)
        buf.fill_(1)
        keep.append(buf)
        print(f"pin_memory {mib} MiB: {growth(before, memory())}")
    before = memory()
    registered = torch.empty(386 * MiB, dtype=torch.uint8)
    registered.fill_(1)
    err = torch.cuda.cudart().cudaHostRegister(registered.data_ptr(), registered.numel(), 0)
    print(f"host_register 386 MiB: {err} {growth(before, memory())} is_pinned {registered.is_pinned()}")
    dst = torch.empty(386 * MiB, dtype=torch.uint8, device="cuda")
    print(f"pin_memory {rate(keep[2], dst):.1f} GB/s")
    print(f"registered {rate(registered, dst):.1f} GB/s")
    torch.cuda.cudart().cudaHostUnregister(registered.data_ptr())


if __name__ == "__main__":
    main()
