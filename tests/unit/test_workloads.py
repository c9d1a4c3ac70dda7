"""Deterministic guest workloads (migrate.workloads, native/wl_workloads.c).

Regions are real private anonymous mappings; pauses come from real signals. Sizes are 16 MiB and
op counts small so the whole file runs in seconds; the > 4 GiB check is marked slow."""

from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import threading
import time
import warnings
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from migrate._native import ffi, lib

from migrate import workloads as wl
from migrate.digest import DIGEST_ALGORITHM, diff_pages, page_hashes, region_digest, zero_map
from migrate.workloads import RunStatus, Workload, WorkloadError

MIB = 1 << 20
SIZE = 16 * MIB
PAGE = 4096
NAMES = ["kv", "stream", "chase", "sparse"]
SMALL_OPS = {"kv": 60_000, "stream": 400_000, "chase": 60_000, "sparse": 60_000}

# Field offsets in struct wl_control (native/wl_workloads.c), for corrupting them on purpose.
OFF_MAGIC, OFF_VERSION, OFF_KIND, OFF_SIZE, OFF_SEED = 0, 8, 12, 16, 24
OFF_PARAM0, OFF_PHASE, OFF_OPS_DONE, OFF_CURSOR0, OFF_STATE_CHECK = 48, 104, 120, 160, 200


@pytest.fixture(autouse=True)
def _no_stray_pause():
    """A pause request is process-global: never let one leak from a test into the next."""
    Workload.clear_pause()
    yield
    Workload.clear_pause()


def new_region(size: int = SIZE) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def full_run_digest(name: str, seed: int = 0, ops: int | None = None, size: int = SIZE) -> str:
    return wl.run_to_completion(name, size, seed=seed, ops=SMALL_OPS[name] if ops is None else ops)


def words(region, start: int = 0, stop: int | None = None) -> array:
    out = array("Q")
    out.frombytes(region[start:stop])
    return out


# ---- catalogue and sizes ---------------------------------------------------------------------


def test_catalogue_lists_the_four_patterns():
    assert sorted(wl.WORKLOADS) == sorted(NAMES)
    kinds = {spec.kind for spec in wl.WORKLOADS.values()}
    assert len(kinds) == 4
    for spec in wl.WORKLOADS.values():
        assert spec.description and spec.access_pattern
        small, big = spec.default_ops("16M"), spec.default_ops("512M")
        assert 0 < small < big
        assert spec.default_ops("2G") == 2 * spec.default_ops("512M")  # square-root scaling


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("512M", 512 * MIB),
        ("1G", 1 << 30),
        ("16MiB", 16 * MIB),
        ("16 MB", 16 * MIB),
        ("4g", 4 << 30),
        ("64k", 64 << 10),
        ("1.5G", 3 << 29),
        ("4096", 4096),
        (8192, 8192),
    ],
)
def test_parse_size(text, nbytes):
    assert wl.parse_size(text) == nbytes


@pytest.mark.parametrize("bad", ["", "M", "12Q", "-5M", "1.3", "0", "1e9", 0, -4096])
def test_parse_size_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="size"):
        wl.parse_size(bad)


def test_parse_size_rejects_wrong_types():
    with pytest.raises(TypeError, match="size must be"):
        wl.parse_size(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="size must be"):
        wl.parse_size(True)


# ---- determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_parameters_same_digest_other_seed_other_digest(name):
    first = full_run_digest(name, seed=1)
    assert first.startswith(DIGEST_ALGORITHM + ":")
    assert full_run_digest(name, seed=1) == first
    assert full_run_digest(name, seed=2) != first
    assert full_run_digest(name, seed=1, ops=SMALL_OPS[name] + 1) != first


def test_kinds_differ_from_each_other():
    assert len({full_run_digest(name, seed=0) for name in NAMES}) == 4


@pytest.mark.parametrize("name", NAMES)
def test_pieces_of_random_size_copied_to_new_addresses_give_the_same_region(name):
    """Budgets of random sizes, with the region copied into a fresh mapping (another address)
    between pieces, end byte-identical to one uninterrupted run."""
    ops = SMALL_OPS[name]
    want = full_run_digest(name, seed=7, ops=ops)
    spec = wl.WORKLOADS[name]
    total_units = spec.init_steps(SIZE) + ops
    rng = random.Random(name)
    region = new_region()
    workload = Workload.init(region, name, seed=7, ops=ops)
    pieces = 0
    addresses = set()
    while True:
        budget = rng.choice([1, 2, 17, rng.randrange(1, total_units // 3 + 2)])
        status = workload.run(max_ops=budget)
        pieces += 1
        addresses.add(int(ffi.cast("uintptr_t", ffi.from_buffer(region))))
        if status is RunStatus.DONE:
            break
        assert status is RunStatus.BUDGET
        # Move: copy every byte into a new mapping, drop the old one, attach there.
        moved = new_region()
        moved[:] = region[:]
        workload.close()
        region.close()
        region = moved
        workload = Workload(region)
    assert pieces >= 4 and len(addresses) >= 2
    assert workload.ops_done == workload.total_ops == ops
    assert workload.info()["phase"] == "done"
    assert workload.digest() == want
    workload.close()
    region.close()


_TINY_OPS = 3000
_tiny_reference: dict[str, str] = {}


@settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    name=st.sampled_from(NAMES),
    budgets=st.lists(st.integers(min_value=1, max_value=20_000), min_size=1, max_size=12),
    move_after=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_any_split_of_the_work_gives_the_same_region(name, budgets, move_after):
    """Property: whatever the budgets, and whichever pieces are followed by a move to a fresh
    mapping, the region ends as an uninterrupted run's does (1 MiB regions, so it stays fast)."""
    size = wl.MIN_SIZE
    if name not in _tiny_reference:
        _tiny_reference[name] = wl.run_to_completion(name, size, seed=11, ops=_TINY_OPS)
    region = new_region(size)
    workload = Workload.init(region, name, seed=11, ops=_TINY_OPS)
    for budget, move in zip(budgets, move_after, strict=False):
        if workload.run(max_ops=budget) is RunStatus.DONE:
            break
        if move:
            moved = new_region(size)
            moved[:] = region[:]
            workload.close()
            region.close()
            region, workload = moved, Workload(moved)
    workload.run()
    assert workload.digest() == _tiny_reference[name]
    workload.close()
    region.close()


def test_run_after_done_stays_done_and_changes_nothing():
    region = new_region()
    with Workload.init(region, "kv", ops=1000) as workload:
        assert workload.run() is RunStatus.DONE
        before = region_digest(region)
        assert workload.run() is RunStatus.DONE
        assert workload.run(max_ops=5) is RunStatus.DONE
        assert region_digest(region) == before
    region.close()


def test_budget_counts_init_steps_and_operations():
    region = new_region()
    with Workload.init(region, "chase", ops=100) as workload:
        init_steps = wl.WORKLOADS["chase"].init_steps(SIZE)
        assert workload.info()["init_total"] == init_steps
        assert workload.run(max_ops=init_steps - 1) is RunStatus.BUDGET
        info = workload.info()
        assert (info["phase"], info["init_done"], info["ops_done"]) == ("init", init_steps - 1, 0)
        assert workload.run(max_ops=11) is RunStatus.BUDGET
        info = workload.info()
        assert (info["phase"], info["init_done"], info["ops_done"]) == ("run", init_steps, 10)
        assert workload.run() is RunStatus.DONE
        assert workload.ops_done == 100
    region.close()


# ---- pausing ---------------------------------------------------------------------------------


def test_request_pause_before_run_pauses_at_once_and_is_consumed():
    region = new_region()
    with Workload.init(region, "sparse", ops=1000) as workload:
        Workload.request_pause()
        assert lib.wl_pause_pending() == 1
        assert workload.run() is RunStatus.PAUSED
        assert lib.wl_pause_pending() == 0
        assert workload.info()["init_done"] == 0
        assert workload.run() is RunStatus.DONE
    region.close()
    assert region_digest_of("sparse", 1000) == full_run_digest("sparse", ops=1000)


def region_digest_of(name: str, ops: int, seed: int = 0) -> str:
    return wl.reference_digest(name, SIZE, seed=seed, ops=ops, cache=False)


def _pause_midrun_and_compare(name: str, trigger, during_init: bool = False) -> None:
    """Start an endless run, trigger a pause from another thread once progress shows the run is
    inside its operations (or its init phase), then check the paused region equals a fresh run
    stopped by budget at the same point, and that both continue identically."""
    endless = 1 << 62
    init_steps = wl.WORKLOADS[name].init_steps(SIZE)
    region = new_region()
    workload = Workload.init(region, name, seed=3, ops=endless)

    def reached() -> bool:
        if during_init:
            return Workload.progress_init() >= 4096
        return Workload.progress() >= 20_000

    def pauser():
        deadline = time.monotonic() + 60
        while not reached() and time.monotonic() < deadline:
            time.sleep(0.0002 if during_init else 0.001)
        trigger()

    Workload.reset_progress()  # the counter is process-global: clear the previous test's value
    thread = threading.Thread(target=pauser)
    thread.start()
    status = workload.run()  # in C, GIL released, until the pause arrives
    thread.join()
    assert status is RunStatus.PAUSED
    info = workload.info()
    done, init_done = info["ops_done"], info["init_done"]
    if during_init:
        assert 4096 <= init_done < init_steps and done == 0
    else:
        assert init_done == init_steps and done >= 20_000
    assert Workload.progress() == done  # the mirror is exact when run returns
    assert Workload.progress_init() == init_done

    reference_region = new_region()
    with Workload.init(reference_region, name, seed=3, ops=endless) as reference:
        assert reference.run(max_ops=init_done + done) is RunStatus.BUDGET
        assert region_digest(reference_region) == region_digest(region)
        # Both continue the same way, the paused one from a copy at another address.
        moved = new_region()
        moved[:] = region[:]
        workload.close()
        region.close()
        with Workload(moved) as resumed:
            assert resumed.run(max_ops=5000) is RunStatus.BUDGET
            assert reference.run(max_ops=5000) is RunStatus.BUDGET
            assert region_digest(moved) == region_digest(reference_region)
        moved.close()
    reference_region.close()


@pytest.mark.parametrize("name", NAMES)
def test_pause_requested_from_another_thread(name):
    _pause_midrun_and_compare(name, Workload.request_pause)


@pytest.mark.parametrize("name", ["kv", "chase"])
def test_pause_during_the_init_phase(name):
    _pause_midrun_and_compare(name, Workload.request_pause, during_init=True)


def test_memfd_shared_region_runs_like_a_private_one():
    """Guests may live in memfd (shared) memory: same results, and a private copy resumes it."""
    fd = os.memfd_create("wl-test")
    try:
        os.ftruncate(fd, SIZE)
        shared = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED)
        with Workload.init(shared, "kv", seed=2, ops=30_000) as workload:
            assert workload.run(max_ops=280_000) is RunStatus.BUDGET
        private = new_region()
        private[:] = shared[:]
        with Workload(private) as workload:
            assert workload.run() is RunStatus.DONE
        assert region_digest(private) == full_run_digest("kv", seed=2, ops=30_000)
        private.close()
        shared.close()
    finally:
        os.close(fd)


def test_pause_by_real_signal_while_run_is_in_c():
    previous = signal.getsignal(signal.SIGUSR1)
    Workload.install_pause_signal(signal.SIGUSR1)
    try:
        _pause_midrun_and_compare("kv", lambda: os.kill(os.getpid(), signal.SIGUSR1))
        _pause_midrun_and_compare("stream", lambda: os.kill(os.getpid(), signal.SIGUSR1))
    finally:
        signal.signal(signal.SIGUSR1, previous if previous is not None else signal.SIG_DFL)


def test_install_pause_signal_rejects_bad_signal():
    with pytest.raises(OSError, match="sigaction"):
        Workload.install_pause_signal(signal.SIGKILL)


# ---- what each pattern touches ---------------------------------------------------------------


def test_sparse_touches_about_ten_percent_of_pages_and_never_the_others():
    region = new_region()
    with Workload.init(region, "sparse", ops=0) as workload:
        workload.run()
    data_pages = SIZE // PAGE - 1
    after_init = [i for i, z in enumerate(zero_map(region)) if not z and i > 0]
    assert 0.08 * data_pages <= len(after_init) <= 0.12 * data_pages
    # Spread over the whole region, not clustered: every sixteenth has some.
    assert {i * 16 // (data_pages + 1) for i in after_init} == set(range(16))
    region.close()

    region = new_region()
    with Workload.init(region, "sparse", ops=200_000) as workload:
        workload.run()
    after_ops = [i for i, z in enumerate(zero_map(region)) if not z and i > 0]
    assert after_ops == after_init  # operations stay inside the chosen pages
    region.close()


def test_stream_dirties_sequentially():
    region = new_region()
    lines_per_page = PAGE // 64
    with Workload.init(region, "stream", ops=10**9) as workload:
        workload.run(max_ops=1)
        assert [i for i, z in enumerate(zero_map(region)) if not z] == [0, 1]
        previous = page_hashes(region)
        last_page = 1
        for budget in (lines_per_page * 10, lines_per_page * 3 + 5, lines_per_page * 50):
            assert workload.run(max_ops=budget) is RunStatus.BUDGET
            hashes = page_hashes(region)
            changed = [i for i in diff_pages(previous, hashes) if i > 0]
            # The pages written by this piece are contiguous and follow the previous piece.
            assert changed == list(range(changed[0], changed[-1] + 1))
            assert changed[0] in (last_page, last_page + 1)
            last_page = changed[-1]
            previous = hashes
        # Still inside the first sweep: everything past the written prefix is untouched.
        assert all(zero_map(region)[last_page + 1 :])
    region.close()


def test_stream_window_advances_by_a_sixteenth_per_sweep():
    nlines = (SIZE - PAGE) // 64
    window, step = nlines // 4, nlines // 16
    region = new_region()
    with Workload.init(region, "stream", ops=10**9) as workload:
        workload.run(max_ops=window)  # exactly one sweep
        first = page_hashes(region)
        first_untouched = 1 + -(-window * 64 // PAGE)  # data starts at page 1
        assert not zero_map(region)[first_untouched - 1]
        assert all(zero_map(region)[first_untouched:])
        workload.run(max_ops=64)  # 64 lines of the second sweep, which starts at line `step`
        changed = [i for i in diff_pages(first, page_hashes(region)) if i > 0]
        first_byte, last_byte = step * 64, (step + 64) * 64 - 1
        assert changed == list(range(1 + first_byte // PAGE, 2 + last_byte // PAGE))
    region.close()


def _kv_slots(region) -> tuple[array, array]:
    slots = words(region, PAGE)
    return slots[0::8], slots[1::8]  # keys, versions


def test_kv_preload_spreads_over_the_whole_region_at_half_load():
    region = new_region()
    with Workload.init(region, "kv", ops=0) as workload:
        workload.run()
    nslots = (SIZE - PAGE) // 64
    keys, versions = _kv_slots(region)
    present = [k for k in keys if k]
    assert sorted(present) == list(range(1, nslots // 2 + 1))  # each key once: 50% load
    assert not any(versions)
    assert not any(zero_map(region))  # every page holds some keys
    region.close()


def test_kv_operations_are_zipf_skewed_gets_and_puts():
    ops = 400_000
    region = new_region()
    with Workload.init(region, "kv", ops=ops) as workload:
        assert workload.run() is RunStatus.DONE
    keys, versions = _kv_slots(region)
    version_of = {k: v for k, v in zip(keys, versions, strict=True) if k}
    puts = sum(version_of.values())
    assert 0.19 * ops <= puts <= 0.21 * ops  # about one put in five
    # Zipf with s = 0.99: P(rank 1) / P(rank 2) = 2**0.99 ~ 1.99, and rank 1 takes several
    # percent of all accesses (uniform would give each key about 1e-5 of them).
    assert version_of[1] > 0.04 * puts
    assert 1.8 < version_of[1] / version_of[2] < 2.2
    assert 2.7 < version_of[1] / version_of[3] < 3.2
    # Hot keys sit all over the table, not in one corner.
    nslots = len(keys)
    hot_slots = sorted(keys.index(k) for k in range(1, 65))
    assert {s * 8 // nslots for s in hot_slots} == set(range(8))
    region.close()


def test_chase_builds_one_cycle_through_every_node_and_writes_rarely():
    ops = 64_000
    region = new_region()
    with Workload.init(region, "chase", ops=ops) as workload:
        assert workload.run(max_ops=wl.WORKLOADS["chase"].init_steps(SIZE)) is RunStatus.BUDGET
        node_words = words(region, PAGE)
        nnodes = len(node_words) // 8
        assert not any(node_words[i * 8 + j] for i in range(0, nnodes, 97) for j in range(1, 8))
        # Nodes store (next ^ own index); follow the cycle from node 0 back to node 0.
        order = [0]
        node = node_words[0] ^ 0
        while node != 0:
            order.append(node)
            node = node_words[node * 8] ^ node
            assert len(order) <= nnodes
        assert len(order) == nnodes
        assert workload.run() is RunStatus.DONE
    node_words = words(region, PAGE)
    written = [i for i in range(nnodes) if any(node_words[i * 8 + 1 : i * 8 + 8])]
    assert 0.8 * ops / 16 <= len(written) <= 1.2 * ops / 16  # a write one hop in 16
    assert set(written) <= set(order[1 : ops + 1])  # only along the path followed
    cursor = struct.unpack_from("<Q", region, OFF_CURSOR0)[0]
    assert cursor == order[ops % nnodes]
    region.close()


# ---- bad parameters and damaged regions ------------------------------------------------------


def test_init_rejects_bad_parameters():
    region = new_region()
    with pytest.raises(ValueError, match="unknown workload 'nope'; known: chase, kv, sparse"):
        Workload.init(region, "nope")
    with pytest.raises(ValueError, match="differs from the buffer"):
        Workload.init(region, "kv", size="32M")
    with pytest.raises(ValueError, match="seed"):
        Workload.init(region, "kv", seed=-1)
    with pytest.raises(ValueError, match="ops"):
        Workload.init(region, "kv", ops=2**64)
    with pytest.raises(TypeError, match="writable buffer"):
        Workload.init(bytes(SIZE), "kv")
    region.close()
    with pytest.raises(ValueError, match="too small"):
        Workload.init(bytearray(64 * 1024), "kv")
    with pytest.raises(ValueError, match="not a multiple of the 4096-byte page"):
        Workload.init(bytearray(SIZE + 8), "kv")
    workload = Workload.init(bytearray(wl.MIN_SIZE), "stream")
    with pytest.raises(ValueError, match="max_ops"):
        workload.run(max_ops=-1)
    workload.close()


def test_native_init_rejects_bad_parameters():
    buf = bytearray(wl.MIN_SIZE)
    pointer = ffi.from_buffer("uint8_t[]", buf)
    assert lib.wl_init(pointer, len(buf), 0, 0, 1) == lib.WL_EINVAL  # unknown kind
    assert lib.wl_init(pointer, len(buf), 99, 0, 1) == lib.WL_EINVAL
    assert lib.wl_init(pointer, len(buf) - 8, lib.WL_KIND_KV, 0, 1) == lib.WL_EINVAL
    assert lib.wl_init(pointer, PAGE, lib.WL_KIND_KV, 0, 1) == lib.WL_EINVAL
    assert lib.wl_init(ffi.NULL, len(buf), lib.WL_KIND_KV, 0, 1) == lib.WL_EINVAL
    assert lib.wl_run(ffi.NULL, 0) == lib.WL_EINVAL
    assert not any(buf)  # nothing written on refusal


def _initialised(name: str = "kv", ops: int = 1000, size: int = SIZE) -> mmap.mmap:
    region = new_region(size)
    with Workload.init(region, name, ops=ops) as workload:
        workload.run(max_ops=100)
    return region


def _poke(region, offset: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, region, offset, value)


@pytest.mark.parametrize(
    "offset, fmt, value, code, words_in_message",
    [
        (OFF_MAGIC, "<Q", 0x1234, "WL_EMAGIC", "bad magic"),
        (OFF_VERSION, "<I", 999, "WL_EVERSION", "another workload version"),
        (OFF_KIND, "<I", 77, "WL_EKIND", "unknown workload kind"),
        (OFF_KIND, "<I", 2, "WL_EHEADER", "header corrupted"),  # a valid but different kind
        (OFF_SIZE, "<Q", 32 * MIB, "WL_EHEADER", "header corrupted"),
        (OFF_SEED, "<Q", 5, "WL_EHEADER", "header corrupted"),
        (OFF_PARAM0, "<Q", 1, "WL_EHEADER", "header corrupted"),
        (OFF_OPS_DONE, "<Q", 3, "WL_ESTATE", "state corrupted"),
        (OFF_PHASE, "<Q", 2, "WL_ESTATE", "state corrupted"),
        (OFF_STATE_CHECK, "<Q", 0, "WL_ESTATE", "state corrupted"),
    ],
)
def test_corrupted_control_block_is_a_clear_error(offset, fmt, value, code, words_in_message):
    region = _initialised()
    workload = Workload(region)  # attached while still valid
    _poke(region, offset, fmt, value)
    with pytest.raises(WorkloadError, match=words_in_message) as caught:
        Workload(region)
    assert caught.value.code == getattr(lib, code)
    with pytest.raises(WorkloadError, match=words_in_message):
        workload.run()  # the native run refuses too, rather than run on garbage
    with pytest.raises(WorkloadError):
        workload.check()
    workload.close()
    region.close()


def test_foreign_and_blank_regions_are_refused():
    with pytest.raises(WorkloadError, match="bad magic"):
        Workload(new_region())  # all zero
    garbage = bytearray(random.Random(9).randbytes(wl.MIN_SIZE))
    with pytest.raises(WorkloadError, match="bad magic"):
        Workload(garbage)


def test_region_of_the_wrong_size_is_refused():
    region = _initialised()
    bigger = new_region(2 * SIZE)
    bigger[:SIZE] = region[:]
    with pytest.raises(WorkloadError, match="region size differs") as caught:
        Workload(bigger)
    assert caught.value.code == lib.WL_ESIZE
    with pytest.raises(WorkloadError, match="region size differs"):
        Workload(memoryview(region)[: SIZE - PAGE])
    bigger.close()
    region.close()


def test_damaged_kv_table_is_detected_not_followed():
    region = new_region()
    with Workload.init(region, "kv", ops=10**6) as workload:
        assert workload.run(max_ops=wl.WORKLOADS["kv"].init_steps(SIZE) + 10) is RunStatus.BUDGET
        region[PAGE:] = bytes(SIZE - PAGE)  # the table is gone, the control block intact
        with pytest.raises(WorkloadError, match="workload data corrupted") as caught:
            workload.run()
        assert caught.value.code == lib.WL_ECORRUPT
    region.close()


def test_damaged_chase_link_is_detected_not_followed():
    init_steps = wl.WORKLOADS["chase"].init_steps(SIZE)
    region = new_region()
    with Workload.init(region, "chase", ops=10**6) as workload:
        workload.run(max_ops=init_steps)
        nnodes = (SIZE - PAGE) // 64
        for node in range(nnodes):  # every link points past the end
            struct.pack_into("<Q", region, PAGE + node * 64, (nnodes + 5) ^ node)
        with pytest.raises(WorkloadError, match="workload data corrupted"):
            workload.run()
    region.close()


def test_closed_handle_is_refused():
    region = new_region()
    workload = Workload.init(region, "kv", ops=10)
    workload.close()
    with pytest.raises(ValueError, match="closed"):
        workload.run()
    region.close()  # possible: the handle released its buffer


# ---- reference digests and their cache -------------------------------------------------------


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "migrate" / "reference-digests.json"


def test_reference_digest_equals_a_full_run_and_is_cached(cache_home):
    want = full_run_digest("kv", seed=4, ops=5000)
    assert wl.cache_path() == cache_home
    assert wl.reference_digest("kv", "16M", seed=4, ops=5000) == want
    text = cache_home.read_text()
    assert want in text and f"wl{wl.WL_VERSION}" in text and DIGEST_ALGORITHM in text
    # A second call answers from the cache: prove it by planting a different (well-formed) value.
    planted = f"{DIGEST_ALGORITHM}:{'ab' * 32}"
    cache_home.write_text(text.replace(want, planted))
    assert wl.reference_digest("kv", SIZE, seed=4, ops=5000) == planted
    assert wl.reference_digest("kv", SIZE, seed=4, ops=5000, cache=False) == want
    # Other parameters are other keys.
    assert wl.reference_digest("kv", SIZE, seed=5, ops=5000) != planted


def test_reference_digest_default_ops(cache_home):
    spec = wl.WORKLOADS["sparse"]
    assert wl.reference_digest("sparse", wl.MIN_SIZE) == wl.reference_digest(
        "sparse", wl.MIN_SIZE, ops=spec.default_ops(wl.MIN_SIZE), cache=False
    )


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"format": 99, "entries": {}}',
        '{"format": 1, "entries": {"KEY": "md5:1234"}}',
    ],
)
def test_corrupt_cache_is_ignored_with_a_warning(cache_home, content):
    want = full_run_digest("stream", ops=3000)
    key = wl._cache_key("stream", SIZE, 0, 3000)
    cache_home.parent.mkdir(parents=True)
    cache_home.write_text(content.replace("KEY", key))
    with pytest.warns(UserWarning, match="ignoring"):
        assert wl.reference_digest("stream", SIZE, ops=3000) == want
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten clean: no warning the second time
        assert wl.reference_digest("stream", SIZE, ops=3000) == want


def test_reference_digest_rejects_bad_parameters(cache_home):
    with pytest.raises(ValueError, match="unknown workload"):
        wl.reference_digest("kvv", SIZE)
    with pytest.raises(ValueError, match="bad size"):
        wl.reference_digest("kv", "lots")
    assert not cache_home.exists()


# ---- beyond 4 GiB ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sparse_reaches_pages_beyond_4_gib():
    """64-bit offsets throughout: a 6 GiB region has marked pages past the 4 GiB mark, and a
    copy of it resumes identically."""
    size = 6 << 30
    ops = 300_000
    region = new_region(size)
    with Workload.init(region, "sparse", ops=ops) as workload:
        assert workload.run(max_ops=wl.WORKLOADS["sparse"].init_steps(size) + ops // 2) is (
            RunStatus.BUDGET
        )
        zmap = zero_map(region)
        nonzero = [i for i, z in enumerate(zmap) if not z]
        high = [i for i in nonzero if i * PAGE >= 4 << 30]
        assert len(high) > 0.3 * len(nonzero)
        assert 0.08 < (len(nonzero) - 1) / (size // PAGE - 1) < 0.12
        assert workload.run() is RunStatus.DONE
        assert workload.digest() == wl.run_to_completion("sparse", size, ops=ops)
    region.close()


@pytest.mark.slow
def test_kv_table_beyond_4_gib():
    """A 4.5 GiB table: every page (past the 4 GiB mark too) holds keys after init, and the
    skewed operations find every key they look up (a lost key would be WL_ECORRUPT)."""
    size = 9 << 29
    region = new_region(size)
    with Workload.init(region, "kv", ops=300_000) as workload:
        assert workload.run() is RunStatus.DONE
        assert workload.info()["init_done"] == (size - PAGE) // 64
        assert not any(zero_map(region))
        last_page = words(region, size - PAGE)
        keys = [k for k in last_page[0::8] if k]
        nkeys = (size - PAGE) // 64 // 2
        assert keys and all(1 <= k <= nkeys for k in keys)
    region.close()
