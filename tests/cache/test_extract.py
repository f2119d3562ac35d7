"""linft.cache.extract: pooled φ-block features of a folder into the cache file, crash-safe and resumable."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from linft.cache import cache_info, extract_features, open_cache, provenance_sha256, verify_cache
from linft.data import load_image_folder, seed_hash
from linft.data.images import augmented_views_uint8, normalize_uint8
from linft.errors import LinftError
from linft.models import PooledBlockFeatures, load_backbone
from helpers import refused

# Tiny CPU models on a shared machine; one thread also gives the in-process and subprocess runs the same kernels.
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(backbone="resnet18", weights="none", image_size=32, batch_size=4, workers=0,
             device="cpu", progress=False)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_threads_env() -> dict:
    """The environment of a child process that computes with this process's number of threads.

    Resumed files are compared bit for bit with one written here: the same code path, so the same
    kernels are needed; with another thread count a reduction may be split differently.
    """
    n = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def _independent_features(root: Path, paths, image_size):
    """DomainBed's eval transform (torchvision Compose) + forward hooks, pooled with mean."""
    tf = transforms.Compose([
        transforms.Resize((image_size, image_size)), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    model = load_backbone("resnet18", "none").model
    x = torch.stack([tf(Image.open(root / p).convert("RGB")) for p in paths])
    got = {}
    for n in ("layer4.0", "layer4.1"):
        dict(model.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.mean((2, 3))))
    with torch.no_grad():
        model(x)
    return torch.stack([got["layer4.0"], got["layer4.1"]], 1).numpy()


def test_round_trip_matches_an_independent_computation(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    res = extract_features(image_folder, out, dtype="float32", **SMALL)
    assert res.status == "extracted" and res.num_extracted == 18
    cache = open_cache(out)
    ds = load_image_folder(image_folder)
    assert cache.features.shape == (18, 2, 512) and cache.features.dtype == np.float32
    assert cache.paths == ds.paths
    np.testing.assert_array_equal(cache.labels, ds.labels)
    np.testing.assert_array_equal(cache.domains, ds.domain_ids)
    assert cache.valid.all()
    assert cache.domain_names == ["dom C", "domA", "domB"] and cache.class_names == ["cat", "dog"]
    assert cache.block_names == ["layer4.0", "layer4.1"]
    # Two code paths (uint8 decode + normalisation on the batch, batches of 4, adaptive pooling; versus float
    # ToTensor + Normalize per image, one batch of 18, mean): float32 rounding differs in order only, ~1e-6
    # relative after 18 layers, whatever the CPU's vector width.
    np.testing.assert_allclose(cache.features, _independent_features(image_folder, ds.paths, 32), rtol=1e-4, atol=1e-5)
    meta = cache.meta
    for key in ("backbone", "weights", "weights_sha256", "blocks", "image_size", "transform", "dtype",
                "dataset_root", "per_domain", "file_list_sha256", "linft_version", "torch_version",
                "torchvision_version", "created", "complete"):
        assert key in meta
    assert meta["per_domain"]["domA"] == {"count": 6, "classes": {"cat": 3, "dog": 3}}
    assert meta["weights_sha256"] == load_backbone("resnet18", "none").weights_sha256
    assert meta["provenance_sha256"] == provenance_sha256(meta)
    np.testing.assert_array_equal(cache.domain_indices("domA"), np.arange(6, 12))


def test_identical_rerun_returns_at_once_and_leaves_file(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    extract_features(image_folder, out, **SMALL)
    before = sha(out), out.stat().st_mtime_ns
    res = extract_features(image_folder, out, **{**SMALL, "batch_size": 7})
    assert res.status == "up-to-date" and res.num_extracted == 0
    assert (sha(out), out.stat().st_mtime_ns) == before


def test_different_provenance_is_refused_unless_forced(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    extract_features(image_folder, out, **SMALL)
    before = sha(out)
    with refused("out") as err:
        extract_features(image_folder, out, num_blocks=1, **SMALL)
    assert "(blocks" in str(err.value)  # names what differs
    assert sha(out) == before
    other = tmp_path / "notes.h5"
    other.write_text("my notes")
    with refused("out"):
        extract_features(image_folder, other, **SMALL)
    assert other.read_text() == "my notes"
    res = extract_features(image_folder, out, num_blocks=1, force=True, **SMALL)
    assert res.status == "extracted" and open_cache(out).features.shape == (18, 1, 512)


class _Stop(Exception):
    pass


def _stop_after(k):
    """An ``on_checkpoint`` hook that interrupts the extraction once ``k`` rows are on disk."""
    def on_checkpoint(done, total):
        if done >= k:
            raise _Stop
    return on_checkpoint


def _reference_and_interrupted(image_folder, tmp_path):
    """``(ref, out)``: ref.h5 extracted in one go, and c.h5 whose extraction stopped once 8 rows were on disk."""
    ref = tmp_path / "ref.h5"
    extract_features(image_folder, ref, **SMALL)
    out = tmp_path / "c.h5"
    with pytest.raises(_Stop):
        extract_features(image_folder, out, on_checkpoint=_stop_after(8), **SMALL)
    return ref, out


def test_interrupted_extraction_resumes_to_the_same_file_content(image_folder, tmp_path):
    ref, out = _reference_and_interrupted(image_folder, tmp_path)
    partial = tmp_path / "c.h5.partial"
    assert not out.exists() and partial.exists()
    info = cache_info(partial)
    assert info["complete"] is False and info["num_done"] == 8
    with pytest.raises(LinftError, match="unfinished extraction"):
        open_cache(partial)
    with pytest.raises(LinftError, match="does not exist .*unfinished extraction"):
        open_cache(out)
    assert not verify_cache(partial).ok
    seen = []
    res = extract_features(image_folder, out, on_checkpoint=lambda d, n: seen.append(d), **SMALL)
    assert res.status == "resumed" and res.num_extracted == 10 and seen[0] == 12
    assert not partial.exists()
    a, b = open_cache(ref), open_cache(out)
    # 8 is a multiple of the batch size: the resumed rows go through the same batches, the same code path
    np.testing.assert_array_equal(a.features, b.features)
    assert a.provenance_sha256 == b.provenance_sha256


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from linft.cache.extract import extract_features
    def on_checkpoint(done, total):
        if done >= int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    extract_features(sys.argv[1], sys.argv[2], backbone="resnet18", weights="none", image_size=32,
                     batch_size=4, workers=int(sys.argv[4]), device="cpu", progress=False, on_checkpoint=on_checkpoint)
""")


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_equals_uninterrupted(image_folder, tmp_path, workers):
    ref, out = tmp_path / "ref.h5", tmp_path / "c.h5"
    extract_features(image_folder, ref, **SMALL)
    env = same_threads_env()
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(image_folder), str(out), "12", str(workers)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and cache_info(str(out) + ".partial")["num_done"] == 12
    cli = subprocess.run([sys.executable, "-m", "linft.cli.main", "extract", str(image_folder), "--out", str(out),
                          "--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4",
                          "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert cli.returncode == 0, cli.stderr
    assert "6 images extracted, 12 already done" in cli.stdout
    # the same batches in every process, computed with the same thread count: the same code path
    np.testing.assert_array_equal(open_cache(ref).features, open_cache(out).features)


def test_unreadable_partial_file_is_discarded_with_a_warning(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    Path(str(out) + ".partial").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)  # torn write
    with pytest.warns(UserWarning, match="discarding unreadable partial file"):
        res = extract_features(image_folder, out, **SMALL)
    assert res.status == "extracted" and verify_cache(out).ok


def test_partial_of_other_settings_is_refused_unless_forced(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    with pytest.raises(_Stop):
        extract_features(image_folder, out, num_blocks=1, on_checkpoint=_stop_after(4), **SMALL)
    partial = Path(str(out) + ".partial")
    before = sha(partial)
    with pytest.raises(LinftError, match="unfinished extraction with different settings \\(blocks"):
        extract_features(image_folder, out, **SMALL)
    assert sha(partial) == before
    assert extract_features(image_folder, out, force=True, **SMALL).status == "extracted"


def test_corrupt_image_fails_by_name_or_is_skipped(image_folder, tmp_path):
    bad = image_folder / "domA" / "dog" / "img01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "c.h5"
    with refused("skip_bad_images") as err:
        extract_features(image_folder, out, **SMALL)
    assert "domA/dog/img01.png" in str(err.value)
    assert not out.exists()
    res = extract_features(image_folder, out, skip_bad_images=True, **{**SMALL, "workers": 2})
    assert res.skipped_paths == ["domA/dog/img01.png"]
    cache = open_cache(out)
    i = cache.paths.index("domA/dog/img01.png")
    assert not cache.valid[i] and cache.valid.sum() == 17
    assert (cache.features[i] == 0).all() and (cache.features[cache.valid] != 0).any()
    assert cache.meta["skipped_paths"] == ["domA/dog/img01.png"]


def test_unwritable_and_full_locations(image_folder, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with refused("out_dir"):
        extract_features(image_folder, blocker / "c.h5", **SMALL)

    class Usage:
        free = 1000

    monkeypatch.setattr("linft.cache.extract.shutil.disk_usage", lambda p: Usage)
    with refused("out"):
        extract_features(image_folder, tmp_path / "c.h5", **SMALL)
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.partial").exists()


def test_bad_arguments(image_folder, tmp_path):
    with refused("dtype"):
        extract_features(image_folder, tmp_path / "c.h5", **dict(SMALL, dtype="int8"))
    with refused("device"):
        extract_features(image_folder, tmp_path / "c.h5",
                         **dict(SMALL, device="cuda" if not torch.cuda.is_available() else "tpu"))


def test_augmented_views_are_deterministic_resumable_and_match_their_transform(image_folder, tmp_path):
    ref = tmp_path / "ref.h5"
    extract_features(image_folder, ref, views=2, dtype="float32", **SMALL)
    cache = open_cache(ref)
    assert cache.views.shape == (18, 2, 2, 512) and cache.meta["views"] == 2
    assert not np.allclose(cache.views[:, 0], cache.features) and not np.allclose(cache.views[:, 0], cache.views[:, 1])
    # an independent computation of row 7's views
    model = load_backbone("resnet18", "none").model
    x = augmented_views_uint8(image_folder / cache.paths[7], 32, 2, seed_hash("views", 0, 7))
    with torch.no_grad():
        expected = PooledBlockFeatures(model, ["layer4.0", "layer4.1"])(normalize_uint8(x)).numpy()
    # the same images through another batch (2 views alone, not 4 rows x 3 images): a tolerance for the order
    # of float32 sums, ~1e-6 relative
    np.testing.assert_allclose(cache.views[7], expected, rtol=1e-4, atol=1e-5)
    # interrupted, resumed with workers: the same file content
    out = tmp_path / "c.h5"
    with pytest.raises(_Stop):
        extract_features(image_folder, out, views=2, dtype="float32", on_checkpoint=_stop_after(8), **SMALL)
    extract_features(image_folder, out, views=2, dtype="float32", **dict(SMALL, workers=2))
    np.testing.assert_array_equal(open_cache(out).views, cache.views)
    assert verify_cache(out).ok
    # views change the provenance; none keeps the old hash scheme
    plain = tmp_path / "plain.h5"
    extract_features(image_folder, plain, dtype="float32", **SMALL)
    assert open_cache(plain).provenance_sha256 != cache.provenance_sha256 and open_cache(plain).views is None


def test_truncated_partial_is_discarded_and_extraction_restarts(image_folder, tmp_path):
    ref, out = _reference_and_interrupted(image_folder, tmp_path)
    partial = Path(str(out) + ".partial")
    data = partial.read_bytes()
    partial.write_bytes(data[: len(data) - 4096])  # what a full disk or power loss leaves
    with pytest.warns(UserWarning, match="discarding unreadable partial file"):
        assert extract_features(image_folder, out, **SMALL).status == "extracted"
    np.testing.assert_array_equal(open_cache(ref).features, open_cache(out).features)


WRITE_LIMIT_SCRIPT = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    from linft.cli.main import main
    main(sys.argv[2:])
""")


def test_a_write_failure_is_one_line_and_resumable(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    args = ["extract", str(image_folder), "--out", str(out), "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--dtype", "float32",
            "--quiet"]
    env = same_threads_env()
    proc = subprocess.run([sys.executable, "-c", WRITE_LIMIT_SCRIPT, "30000", *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert "Traceback" not in proc.stderr and len(errors) == 1 and "to resume" in errors[0]
    assert not out.exists()
    done = subprocess.run([sys.executable, "-m", "linft.cli.main", *args], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert verify_cache(out).ok


def test_negative_workers_refused(image_folder, tmp_path):
    with refused("workers"):
        extract_features(image_folder, tmp_path / "c.h5", **dict(SMALL, workers=-1))


def test_rows_claimed_but_not_written_are_redone(image_folder, tmp_path):
    """A full disk leaves holes: the file says 8 rows are done, but some read back as the fill value (zeros,
    valid False). A resume proves each row by its digest and redoes from the first one that is not proven."""
    import h5py
    ref, out = _reference_and_interrupted(image_folder, tmp_path)
    partial = Path(str(out) + ".partial")
    with h5py.File(partial, "r+") as f:
        assert f.attrs["num_done"] == 8
        f["features"][5:8] = 0  # rows 5-7 never reached the disk
        f["valid"][5:8] = False
    seen = []
    res = extract_features(image_folder, out, on_checkpoint=lambda d, n: seen.append(d), **SMALL)
    # resumed from row 4, the start of the batch of the first unproven row (batches of 4: the same batches)
    assert res.status == "resumed" and res.num_extracted == 14 and seen[0] == 8
    assert res.skipped_paths == []  # no good image reported as skipped
    a, b = open_cache(ref), open_cache(out)
    np.testing.assert_array_equal(a.features, b.features)  # rows 4.. through the same batches: same code path
    assert b.valid.all() and verify_cache(out).ok


def test_a_partial_without_digests_proves_nothing(image_folder, tmp_path):
    import h5py
    ref, out = _reference_and_interrupted(image_folder, tmp_path)
    with h5py.File(Path(str(out) + ".partial"), "r+") as f:
        del f["digests"]  # as an older linft wrote it
    res = extract_features(image_folder, out, **SMALL)
    assert res.status == "extracted" and res.num_extracted == 18
    np.testing.assert_array_equal(open_cache(ref).features, open_cache(out).features)


def test_force_always_re_extracts_even_with_the_same_provenance(image_folder, tmp_path):
    """Images edited in place keep their names (so the provenance); --force must not answer 'up to date'."""
    import shutil
    folder = tmp_path / "data"
    shutil.copytree(image_folder, folder)
    out = tmp_path / "c.h5"
    extract_features(folder, out, **SMALL)
    before = open_cache(out)
    first = folder / before.paths[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(first)  # edited in place: same name, new pixels
    assert extract_features(folder, out, **SMALL).status == "up-to-date"
    res = extract_features(folder, out, force=True, **SMALL)
    assert res.status == "extracted" and res.num_extracted == 18
    after = open_cache(out)
    assert after.provenance_sha256 == before.provenance_sha256
    assert not np.array_equal(after.features[0], before.features[0])
    np.testing.assert_array_equal(after.features[1:], before.features[1:])


def test_force_discards_a_partial_of_the_same_provenance(image_folder, tmp_path):
    ref, out = _reference_and_interrupted(image_folder, tmp_path)
    res = extract_features(image_folder, out, force=True, **SMALL)
    assert res.status == "extracted" and res.num_extracted == 18


def test_a_second_extraction_to_the_same_file_is_refused_while_the_first_runs(image_folder, tmp_path):
    """linft's own lock, so it holds where HDF5 file locking is off (HDF5_USE_FILE_LOCKING=FALSE on clusters)."""
    out = tmp_path / "c.h5"
    errors = []
    # the same process holds the lock, so run the second extraction in a child process
    script = textwrap.dedent(f"""
        import sys
        from linft.cache.extract import extract_features
        from linft.errors import LinftError
        try:
            extract_features({str(image_folder)!r}, {str(out)!r}, backbone="resnet18", weights="none",
                             image_size=32, batch_size=4, workers=0, device="cpu", progress=False)
        except LinftError as exc:
            print(exc)
            sys.exit(2)
    """)

    def on_checkpoint(done, total):
        if done == 4:
            proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                                  env={**same_threads_env(), "HDF5_USE_FILE_LOCKING": "FALSE"})
            errors.append((proc.returncode, proc.stdout))
    extract_features(image_folder, out, on_checkpoint=on_checkpoint, **SMALL)
    code, message = errors[0]
    assert code == 2 and "being written by another linft process" in message and f"pid {os.getpid()}" in message
    assert verify_cache(out).ok and not (tmp_path / "c.h5.lock").exists()


def _children() -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the worker processes")
def test_a_killed_decoding_worker_is_one_line_and_the_extraction_resumes(image_folder, tmp_path):
    ref = tmp_path / "ref.h5"
    extract_features(image_folder, ref, **SMALL)
    out = tmp_path / "c.h5"

    def kill_workers(done, total):
        if done == 4:
            for pid in _children():
                os.kill(pid, signal.SIGKILL)
            time.sleep(1.0)  # torch's SIGCHLD handler raises wherever the main process is then
    with refused("workers") as err:
        extract_features(image_folder, out, on_checkpoint=kill_workers, **dict(SMALL, workers=1))
    assert "DataLoader worker" in str(err.value)
    res = extract_features(image_folder, out, **dict(SMALL, workers=1))
    assert res.status == "resumed" and not (tmp_path / "c.h5.lock").exists()
    np.testing.assert_array_equal(open_cache(ref).features, open_cache(out).features)


def test_a_lost_digest_is_not_proof(image_folder, tmp_path):
    """The rows reached the disk but their digests did not: they are redone too."""
    import h5py
    ref, out = _reference_and_interrupted(image_folder, tmp_path)
    with h5py.File(Path(str(out) + ".partial"), "r+") as f:
        f["digests"][6] = 0
    res = extract_features(image_folder, out, **SMALL)
    assert res.status == "resumed" and res.num_extracted == 14
    np.testing.assert_array_equal(open_cache(ref).features, open_cache(out).features)
