"""The memory a process may really use: cgroup v2/v1 (own level and ancestors), RLIMIT_AS, CUDA, the host.

Parsing runs on sample trees shaped like /proc and /sys/fs/cgroup; one test streams a real model inside a real
cgroup limit where this machine allows making one (root and a writable cgroup filesystem).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_weightstream
from hf_weightstream import limits
from hf_weightstream.errors import BudgetError
from hf_weightstream.limits import Limit, MemoryLimits, default_budget, memory_limits

MB = 10**6
HOST_MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n"


def make_proc(root: Path, cgroup: str, mountinfo: str, status: str = "VmSize:  4000000 kB\n") -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "self" / "status").write_text(status)
    (proc / "meminfo").write_text(HOST_MEMINFO)
    return proc


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)


def test_cgroup_v2_limit_of_the_process_and_its_ancestors(tmp_path: Path) -> None:
    mount = tmp_path / "sys/fs/cgroup"
    stat = "anon 200000000\nfile 300000000\nfile_mapped 50000000\nshmem 10000000\nfile_dirty 40000000\n"
    write(mount / "kubepods", memory__max="2000000000\n", memory__current="1500000000\n", memory__stat="file 0\n")
    write(
        mount / "kubepods/pod1/ctr",
        memory__max="1000000000\n",
        memory__current="600000000\n",
        memory__stat=stat,
        memory__high="max\n",
    )
    write(mount / "kubepods/pod1", memory__max="max\n", memory__current="600000000\n")
    proc = make_proc(
        tmp_path,
        "0::/kubepods/pod1/ctr\n",
        f"30 23 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
    )
    found = limits.cgroup_limits(proc)
    by_where = {Path(lim.where).name: lim for lim in found}
    assert set(by_where) == {"ctr", "kubepods"}  # pod1 has no limit ("max")
    # 600 MB charged, of which 300-10-40 = 250 MB is clean page cache (mapped or not) the kernel can drop.
    assert by_where["ctr"].used == 350 * MB and by_where["ctr"].available == 650 * MB
    assert by_where["kubepods"].available == 500 * MB
    # The code's mapped pages are reclaimable, but page cache kept next to the process must leave them be.
    assert by_where["ctr"].mapped == 50 * MB
    assert limits.MemoryLimits((by_where["ctr"],)).page_cache_room() == 600 * MB
    assert all(lim.kind == "cgroup2" and lim.counts_page_cache for lim in found)


def test_cgroup_v2_memory_high_is_a_limit_too(tmp_path: Path) -> None:
    mount = tmp_path / "cg"
    write(mount / "app", memory__max="max\n", memory__high="800000000\n", memory__current="100000000\n")
    proc = make_proc(tmp_path, "0::/app\n", f"30 23 0:26 / {mount} rw - cgroup2 cgroup2 rw\n")
    (found,) = limits.cgroup_limits(proc)
    assert found.limit == 800 * MB and found.available == 700 * MB


def test_cgroup_v1_limit_with_a_container_mount_root_and_hierarchy(tmp_path: Path) -> None:
    # Inside a container the memory hierarchy is often mounted from the container's own cgroup: the mount's
    # root is /docker/abc, and /proc/self/cgroup names /docker/abc.
    mount = tmp_path / "sys/fs/cgroup/memory"
    unlimited = "9223372036854771712\n"
    stat = "total_cache 500000000\ntotal_mapped_file 100000000\ntotal_shmem 0\ntotal_dirty 0\ntotal_writeback 0\n"
    write(
        mount,
        memory__limit_in_bytes="965000000\n",
        memory__usage_in_bytes="700000000\n",
        memory__stat=stat,
        memory__use_hierarchy="1\n",
    )
    write(mount / "job", memory__limit_in_bytes=unlimited, memory__usage_in_bytes="1\n", memory__use_hierarchy="1\n")
    proc = make_proc(
        tmp_path,
        "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc/job\n0::/\n",
        f"40 31 0:35 /docker/abc {mount} rw - cgroup cgroup rw,memory\n",
    )
    (found,) = limits.cgroup_limits(proc)
    assert found.kind == "cgroup1" and Path(found.where) == mount
    assert found.limit == 965_000_000 and found.used == 200 * MB  # 700 charged, 500 clean page cache
    assert found.mapped == 100 * MB and limits.MemoryLimits((found,)).page_cache_room() == 665 * MB


def test_cgroup_v1_without_hierarchy_stops_at_the_process_cgroup(tmp_path: Path) -> None:
    mount = tmp_path / "memory"
    write(mount, memory__limit_in_bytes="100000000\n", memory__usage_in_bytes="0\n")
    write(
        mount / "a",
        memory__limit_in_bytes="500000000\n",
        memory__usage_in_bytes="0\n",
        memory__use_hierarchy="0\n",
    )
    proc = make_proc(tmp_path, "4:memory:/a\n", f"40 31 0:35 / {mount} rw - cgroup cgroup rw,memory\n")
    assert [lim.limit for lim in limits.cgroup_limits(proc)] == [500 * MB]


def test_no_cgroup_files_means_no_cgroup_limit(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, "0::/\n", "22 27 0:21 / /proc rw - proc proc rw\n")
    assert limits.cgroup_limits(proc) == []
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert limits.cgroup_limits(empty) == []  # no /proc at all (macOS): no cgroup, no crash


def test_rlimit_as_counts_what_is_mapped_already(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, "0::/\n", "", status="VmSize:\t 3000000 kB\n")
    lim = limits.rlimit_as_limit(proc, rlimit=5_000_000_000)
    assert lim is not None and lim.available == 5_000_000_000 - 3_072_000_000
    assert limits.rlimit_as_limit(proc, rlimit=-1) is None


def test_host_and_cuda_limits() -> None:
    host = limits.host_limit()
    assert host.kind == "host" and 0 < host.available <= host.limit
    cuda = limits.cuda_limit(torch.device("cuda", 0), mem_get_info=lambda device: (3 * 10**9, 8 * 10**9))
    assert cuda.available == 3 * 10**9 and not cuda.counts_page_cache


def test_tightest_limit_decides_and_default_budget_leaves_room() -> None:
    found = MemoryLimits(
        (
            Limit("cgroup1", "/sys/fs/cgroup/memory/x", 965 * MB, 300 * MB),
            Limit("host", "/proc/meminfo", 16000 * MB, 4000 * MB),
        )
    )
    assert found.available == 665 * MB and found.tightest.kind == "cgroup1"
    budget = default_budget(10_000 * MB, found)
    assert budget.bytes == int(limits.WEIGHT_SHARE * 665 * MB)
    assert "cgroup v1 memory.limit_in_bytes" in budget.explain()
    assert default_budget(100 * MB, found).bytes == 100 * MB  # never more than the cap
    tight = MemoryLimits((Limit("cgroup2", "/x", 300 * MB, 250 * MB),))
    assert default_budget(10_000 * MB, tight).bytes == 0  # 50 MB of room, less than the reserve


def test_memory_limits_of_this_process_include_the_host() -> None:
    found = memory_limits("cpu")
    assert found.limits[-1].kind == "host"
    assert found.available <= found.limits[-1].available


def test_default_budget_below_the_largest_unit_names_the_limit(checkpoints, monkeypatch) -> None:
    tight = MemoryLimits((Limit("cgroup2", "/sys/fs/cgroup/app", 400 * MB, 399 * MB),))
    monkeypatch.setattr("hf_weightstream.integration.memory_limits", lambda device: tight)
    message = r"cgroup v2 memory.max/memory.high /sys/fs/cgroup/app.*the model needs [\d,]+ bytes at once"
    with pytest.raises(BudgetError, match=message):
        AutoModelForCausalLM.from_pretrained(checkpoints("llama"), streaming=True)


def test_default_budget_comes_from_the_limits(checkpoints, monkeypatch) -> None:
    room = 400 * MB
    limited = MemoryLimits((Limit("cgroup1", "/sys/fs/cgroup/memory/job", 1000 * MB, 1000 * MB - room),))
    monkeypatch.setattr("hf_weightstream.integration.memory_limits", lambda device: limited)
    monkeypatch.setattr(limits, "MIN_RESERVE", room - 150_000)
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), streaming=True)
    stats = hf_weightstream.stats(model)
    assert stats["budget_bytes"] == 150_000 < stats["model_bytes"]


def test_default_budget_holds_what_a_small_model_needs_at_once(tmp_path) -> None:
    """Twice a tiny model can be less than an MoE call routed to every expert (or a cast unit's raw and cast
    bytes): the default budget is then what the engine needs at once, where the limits allow it."""
    import tiny
    from transformers import Qwen3MoeForCausalLM

    folder = tmp_path / "moe"
    tiny.qwen3_moe(num_experts=16).save_pretrained(folder)
    model = Qwen3MoeForCausalLM.from_pretrained(folder, streaming=True, dtype=torch.bfloat16)
    engine = model._hf_weightstream
    assert engine.pool.budget >= engine.minimum_budget()
    with torch.no_grad():
        model(torch.arange(40).view(1, 40))  # every expert of every layer routed in one call


# ------------------------------------------------------------------------------------------------ real cgroup
def _cgroup_reason() -> str | None:
    if sys.platform != "linux":
        return "cgroups are Linux only"
    if os.geteuid() != 0:
        return "making a cgroup needs root"
    from benchmarks.memlimit import memory_cgroup

    with memory_cgroup(10**9) as cgroup:
        if cgroup is None:
            return "no writable memory cgroup (v2 memory controller or v1 memory hierarchy) on this machine"
    return None


CHILD = textwrap.dedent(
    """
    import json, sys, torch
    import hf_weightstream
    from transformers import AutoModelForCausalLM
    from benchmarks.memlimit import report

    folder, dtype = sys.argv[1], sys.argv[2]
    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = AutoModelForCausalLM.from_pretrained(folder, streaming=True, **kwargs)
    out = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=4, do_sample=False)
    stats = hf_weightstream.stats(model)
    report({"tokens": out[0].tolist(), "budget": stats["budget_bytes"], "model": stats["model_bytes"],
            "io": stats["io"], "peak": stats["peak_resident_bytes"]})
    """
)


@pytest.fixture(scope="module")
def mid_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~160 MB float32 Llama: bigger than the room the limit below leaves next to torch and transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=16000,
        initializer_range=0.05,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mid") / "model"
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="50MB")
    return folder


@pytest.fixture(scope="module")
def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), TRANSFORMERS_VERBOSITY="error")


@pytest.fixture(scope="module")
def import_rss(child_env: dict[str, str]) -> int:
    """Resident memory of a fresh process that imported torch, transformers and hf_weightstream."""
    reason = _cgroup_reason()
    if reason:
        pytest.skip(reason)
    code = "import hf_weightstream, transformers, torch; print(open('/proc/self/status').read())"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env, check=True)
    return next(int(line.split()[1]) * 1024 for line in probe.stdout.splitlines() if line.startswith("VmRSS"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_streaming_true_in_a_real_cgroup_is_not_killed(
    tmp_path: Path, mid_llama: Path, import_rss: int, child_env: dict[str, str], dtype: str
) -> None:
    """A fresh process, its files cold, in a cgroup whose limit leaves less room than the model needs."""
    from benchmarks.memlimit import run_limited

    folder = mid_llama
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = child_env
    # What the libraries take, plus room for the default's reserve (128 MiB) and a budget below the float32 model.
    # The process holds ~20 MB more at load than the probe's imports: with only 200 MB on top, the bfloat16 case's
    # default budget (room - reserve) fell just below its largest unit (fp32 bytes and their cast) now and then.
    limit = import_rss + 230 * MB
    shards = sorted(folder.glob("*.safetensors"))
    run = run_limited([sys.executable, str(script), str(folder), dtype], limit, shards, env=env)
    assert run.method.startswith("cgroup"), run.method
    assert not run.killed, f"killed under a {limit / MB:.0f} MB limit: {run.stderr[-2000:]}"
    assert run.result is not None, run.error()
    result = run.result
    assert result["peak"] <= result["budget"] < 160 * MB  # below the float32 model: it streams
    reference = AutoModelForCausalLM.from_pretrained(folder, **({} if dtype == "auto" else {"dtype": torch.bfloat16}))
    expected = reference.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=4, do_sample=False)
    assert result["tokens"] == expected[0].tolist()


FRAGMENTED = textwrap.dedent(
    """
    import sys, threading
    import torch
    from transformers import AutoModelForCausalLM
    from hf_weightstream import integration
    from hf_weightstream.limits import Limit, MemoryLimits
    if sys.argv[2] == "limited":  # less room than the model: the load has freed blocks go back at once
        room = 300_000
        tight = MemoryLimits((Limit("cgroup1", "/sys/fs/cgroup/memory/job", 10**9, 10**9 - room),))
        integration.memory_limits = lambda device: tight
    AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="stream", max_memory={"cpu": "200KB"})
    kept = []
    def dequantize_like():  # a reader thread's temporaries, freed between blocks that stay
        big = torch.ones(8 << 20, dtype=torch.uint8)
        del big  # glibc now serves blocks below 8 MiB from its arena
        blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(200)]
        kept.extend(blocks[::2])
    thread = threading.Thread(target=dequantize_like)
    thread.start()
    thread.join()
    print(int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_model_larger_than_the_room_left_has_freed_memory_go_back_to_the_system(checkpoints) -> None:
    """glibc kept the temporaries reader threads freed (FP8 dequantization) between live blocks: an FP8 MoE of
    2.56 GB under an 800 MB cgroup was killed with the default budget, which does not see that memory."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    rss = {}
    for case in ("roomy", "limited"):
        run = subprocess.run(
            [sys.executable, "-c", FRAGMENTED, str(checkpoints("llama")), case],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        rss[case] = int(run.stdout.split()[-1])
    assert rss["limited"] < rss["roomy"] - 60, rss  # the 100 MiB freed between the blocks kept
