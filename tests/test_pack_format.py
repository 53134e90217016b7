"""Pack format v1: atomic writes and every bad-input case with its own typed, named error."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from sparsepack.formats import errors
from sparsepack.formats.adapter_layout import validate_adapter_name
from sparsepack.formats.manifest import MANIFEST_FILE, Manifest
from sparsepack.formats.pack import read_pack, staged_dir, write_pack
from tests.factories import random_adapter, rtn_pack, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture
def pack(tmp_path, model):
    path, _ = rtn_pack(model, tmp_path / "pack", adapters={"ad1": random_adapter(model)})
    return path


def _rewrite_manifest(pack, fn):
    data = json.loads((pack / MANIFEST_FILE).read_text())
    fn(data)
    (pack / MANIFEST_FILE).write_text(json.dumps(data))


def _reseal(pack):
    """Record the edited files' hashes, as a writer would: the damage is then for the deeper checks to find."""
    from sparsepack.formats.pack import record_files

    manifest = Manifest.read(pack / MANIFEST_FILE)
    record_files(pack, manifest)
    (pack / MANIFEST_FILE).write_text(manifest.to_json())


def test_read_back_what_was_written(pack):
    p = read_pack(pack)
    assert p.kind == "sparsepack" and p.quant["bits"] == 4
    assert len(p.quantized_modules) == 2 * 7
    assert set(p.adapters) == {"ad1"} and p.adapters["ad1"].modules
    assert "model.safetensors" in p.manifest.files and MANIFEST_FILE not in p.manifest.files
    assert p.manifest.history[0].stage == "test-rtn"


def test_truncated_safetensors(pack):
    f = pack / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _rewrite_manifest(pack, lambda d: d["files"]["model.safetensors"].update(bytes=f.stat().st_size))
    with pytest.raises(errors.SafetensorsHeaderError, match="model.safetensors.*outside .* data section"):
        read_pack(pack, verify=False)


def test_flipped_byte_fails_the_hash(pack):
    f = pack / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(errors.HashMismatchError, match="model.safetensors: sha256 differs"):
        read_pack(pack)
    read_pack(pack, verify=False)  # the fast mode skips hashes (shapes are still checked)


def test_unknown_format_version(pack):
    _rewrite_manifest(pack, lambda d: d.update(format_version=99))
    with pytest.raises(errors.VersionError, match="sparsepack.json: format_version 99 is not supported"):
        read_pack(pack)


def test_wrong_format_name(pack):
    _rewrite_manifest(pack, lambda d: d.update(format="other"))
    with pytest.raises(errors.ManifestError, match="format is 'other'"):
        read_pack(pack)


def _replace_tensor(pack, name, tensor):
    from safetensors.torch import load_file

    f = pack / "model.safetensors"
    sd = load_file(str(f))
    sd[name] = tensor
    save_file(sd, str(f))
    _reseal(pack)


def test_tensor_with_the_wrong_shape(pack):
    _replace_tensor(pack, "model.layers.0.self_attn.q_proj.scales", torch.zeros(3, 64, dtype=torch.float16))
    with pytest.raises(
        errors.ShapeError, match=r"tensor 'model.layers.0.self_attn.q_proj.scales': shape \[3, 64\]"
    ):
        read_pack(pack)


def test_tensor_with_the_wrong_dtype(pack):
    _replace_tensor(pack, "model.layers.0.self_attn.q_proj.g_idx", torch.zeros(64, dtype=torch.int64))
    with pytest.raises(errors.ShapeError, match="g_idx.*dtype I64 != I32"):
        read_pack(pack)


def test_huge_shape_in_header_fails_before_allocating(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 16]}}).encode()
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    from sparsepack.formats.safetensors_check import read_header

    with pytest.raises(errors.SafetensorsHeaderError, match="needs .* bytes but offsets span 16"):
        read_header(f)


def test_duplicate_tensor_names_in_header(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = ('{"w": ' + entry + ', "w": ' + entry + "}").encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    from sparsepack.formats.safetensors_check import read_header

    with pytest.raises(errors.SafetensorsHeaderError, match="appears twice"):
        read_header(f)


def _edit_sparse(pack, fn):
    from safetensors.torch import load_file

    f = pack / "adapters" / "ad1" / "sparse_adapter.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))
    _reseal(pack)


def test_sparse_index_out_of_range(pack):
    def fn(sd):
        key = next(k for k in sd if k.endswith(".col_idx"))
        sd[key][0] = 10_000

    _edit_sparse(pack, fn)
    with pytest.raises(
        errors.SparseIndexError, match=r"sparse_adapter.safetensors: tensor '.*col_idx': column index"
    ):
        read_pack(pack)


def test_non_monotone_row_ptr(pack):
    def fn(sd):
        key = next(k for k in sd if k.endswith(".row_ptr"))
        rp = sd[key]
        rp[1] = int(rp[-1])  # row 0 claims every entry; row 1 then ends before it starts
        assert int(rp[2]) < int(rp[1])

    _edit_sparse(pack, fn)
    with pytest.raises(errors.SparseIndexError, match="row_ptr is not monotone"):
        read_pack(pack)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "", ".hidden", "x" * 65, "a\\b"])
def test_adapter_names_with_separators_are_refused(name):
    with pytest.raises(errors.UnsafePathError, match="invalid adapter name"):
        validate_adapter_name(name)


def test_adapter_path_escaping_the_pack(pack):
    _rewrite_manifest(pack, lambda d: d["adapters"]["ad1"].update(path="../../etc"))
    with pytest.raises(errors.UnsafePathError, match="escapes the pack"):
        read_pack(pack)


def test_symlink_out_of_the_pack(pack, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (pack / "adapters" / "ad1").rename(tmp_path / "moved")
    (pack / "adapters" / "ad1").symlink_to(tmp_path / "moved")
    with pytest.raises(errors.UnsafePathError, match="resolves outside the pack"):
        read_pack(pack)


def test_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path, monkeypatch):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    d = tmp_path / "model"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    (d / "config.json").write_text(json.dumps(tiny_llama().config.to_dict()))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(errors.UnsafeFileError, match="pytorch_model.bin.*never unpickles"):
        read_pack(d)
    with pytest.raises(errors.UnsafeFileError, match="refused"):
        read_pack(d / "pytorch_model.bin")


def test_output_exists_is_refused_and_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    write_pack(out, Manifest(), lambda d: (d / "a.txt").write_text("1"))
    with pytest.raises(errors.OutputExistsError, match="out: output exists"):
        write_pack(out, Manifest(), lambda d: (d / "a.txt").write_text("2"))
    assert (out / "a.txt").read_text() == "1"
    write_pack(out, Manifest(), lambda d: (d / "a.txt").write_text("3"), overwrite=True)
    assert (out / "a.txt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings left


def test_failed_write_leaves_the_previous_pack_untouched(pack, model):
    before = {p.name: p.read_bytes() for p in pack.iterdir() if p.is_file()}

    def boom(d):
        (d / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_pack(pack, Manifest(), boom, overwrite=True)
    after = {p.name: p.read_bytes() for p in pack.iterdir() if p.is_file()}
    assert before == after
    read_pack(pack)
    assert sorted(p.name for p in pack.parent.iterdir()) == ["pack"]


def test_staged_dir_loses_the_race_cleanly(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(errors.OutputExistsError, match="appeared while writing"):
        with staged_dir(out) as tmp:
            (tmp / "mine").write_text("x")
            out.mkdir()  # another writer finishes first
            (out / "theirs").write_text("y")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
