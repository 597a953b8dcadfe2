"""Scene discovery and frame reading: folders, tar/zip archives, manifests; local and S3."""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import gzip
import io
import json
import logging
import os
import posixpath
import tarfile
import uuid
import zipfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from httm_dist import storage
from httm_dist.data import discover_scenes, natural_key, read_scene_frames, scene_fingerprint
from httm_dist.data import manifest as manifest_mod
from httm_dist.data import scenes as scenes_mod
from httm_dist.data.spec import listed_version, object_version
from httm_dist.errors import ConfigError, SceneError, StorageError
from httm_dist.storage import get_fs, is_local
from http_files import serve

# scene "a": folder with natural-sort names, mixed-case extensions, a nested subfolder,
# plus files that are not frames
FOLDER_FILES = {
    "a/frame10.JPG": b"a10",
    "a/frame2.jpg": b"a2",
    "a/frame1.PNG": b"a1",
    "a/sub/frame0.webp": b"as0",
    "a/Frame3.Jpeg": b"a3",
    "a/notes.txt": b"x",
    "a/.hidden.jpg": b"x",
}
ORDER_A = ["frame1.PNG", "frame2.jpg", "Frame3.Jpeg", "frame10.JPG", "sub/frame0.webp"]  # case-insensitive
MEMBERS = {"f10.jpg": b"t10", "f9.jpg": b"t9", "d/f1.png": b"t1", "readme.md": b"no"}
ORDER_ARCHIVE = ["d/f1.png", "f9.jpg", "f10.jpg"]


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _input_root(request, tmp_path):
    """``(root_url, storage_options, fs, root_path)`` of an empty input root on the storage
    ``request.param`` names (local, memory or s3)."""
    if request.param == "local":
        url, opts = str(tmp_path / "input"), None
    elif request.param == "memory":
        url, opts = f"memory://input-{uuid.uuid4().hex[:12]}/input", None
    else:
        bucket, opts = request.getfixturevalue("s3_bucket")
        url = f"{bucket}/input"
    fs, path = get_fs(url, opts)
    return url, opts, fs, path


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request, tmp_path):
    """An empty input root (see :func:`_input_root`)."""
    return _input_root(request, tmp_path)


def put(fs, path: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        fs.makedirs(f"{path}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{path}/{rel}", data)
    fs.invalidate_cache()


def make_dataset(fs, path: str) -> None:
    put(fs, path, FOLDER_FILES)
    put(fs, path, {"b.tar": tar_bytes(MEMBERS), "c.zip": zip_bytes(MEMBERS), "stray.txt": b"x"})
    put(fs, path, {"d.tar.gz": gzip.compress(tar_bytes(MEMBERS)), "e.tgz": gzip.compress(tar_bytes(MEMBERS))})


def test_natural_key_orders_numbers_by_value():
    names = ["f10.jpg", "f2.jpg", "f1.jpg", "a/f3.jpg", "F0.jpg"]
    assert sorted(names, key=natural_key) == ["a/f3.jpg", "F0.jpg", "f1.jpg", "f2.jpg", "f10.jpg"]


@pytest.mark.parametrize(
    "expected",
    [
        # the reported case: float timestamps written without a fixed number of decimals
        [f"1700000000.{d}.png" for d in ("05", "1", "15", "2", "25", "3")],
        # a second kind: decimal seconds inside a name, across a digit-count change, and no signs
        ["cam-1.5s.jpg", "cam-2.25s.jpg", "cam-9.9s.jpg", "cam-10.0s.jpg", "cam-10.75s.jpg"],
        ["frame_9.png", "frame_10.png", "frame_100.png"],
    ],
)
def test_frames_named_by_numbers_sort_by_value(expected, tmp_path):
    names = list(reversed(expected))
    assert sorted(names, key=natural_key) == expected
    scene = tmp_path / "in" / "s"
    scene.mkdir(parents=True)
    for name in names:
        (scene / name).write_bytes(b"x")
    (found,) = discover_scenes(str(tmp_path / "in"))
    assert [f.uri.rsplit("/", 1)[-1] for f in found.frames] == expected
    assert [f.frame_index for f in found.frames] == list(range(len(expected)))


def test_discover_and_read_folders_and_archives(root, caplog):
    url, opts, fs, path = root
    make_dataset(fs, path)
    with caplog.at_level("WARNING", logger="httm_dist.data.scenes"):
        scenes = discover_scenes(url, opts)
    assert "e.tgz: rename it to .tar.gz" in caplog.text
    # .tgz is skipped with a warning (fsspec's chained URLs only know gzip by ".gz")
    assert [(s.scene_id, s.kind) for s in scenes] == [("a", "folder"), ("b", "tar"), ("c", "zip"), ("d", "tar")]
    a, b, c, d = scenes
    assert [f.name for f in a.frames] == ORDER_A
    assert [f.frame_index for f in a.frames] == list(range(5))
    assert read_scene_frames(a, opts) == [FOLDER_FILES[f"a/{n}"] for n in ORDER_A]
    for archive in (b, c, d):  # plain tar, zip, gzipped tar
        assert [f.name for f in archive.frames] == ORDER_ARCHIVE
        assert read_scene_frames(archive, opts) == [MEMBERS[n] for n in ORDER_ARCHIVE]
        # the frame URI is a chained URL fsspec can open on its own
        uri = archive.frames[-1].uri
        assert uri.startswith(f"{archive.kind}://f10.jpg::")
        inner = {"s3": opts} if opts else {}
        with fsspec.open(uri, "rb", **inner) as fh:
            assert fh.read() == b"t10"
    # frame URIs of folders are readable URLs too
    with fsspec.open(a.frames[0].uri, "rb", **(opts or {})) as fh:
        assert fh.read() == b"a1"


@pytest.mark.s3
def test_bucket_root_as_input(s3_bucket):  # noqa: F811 - the imported fixture
    bucket, opts = s3_bucket
    fs, path = get_fs(bucket, opts)
    put(fs, path, {"x/2.jpg": b"2", "x/10.jpg": b"10", "y.zip": zip_bytes({"1.png": b"1"})})
    scenes = discover_scenes(bucket + "/", opts)
    assert [(s.scene_id, [f.name for f in s.frames]) for s in scenes] == [("x", ["2.jpg", "10.jpg"]), ("y", ["1.png"])]
    assert scenes[0].frames[0].uri == f"{bucket}/x/2.jpg"
    assert read_scene_frames(scenes[1], opts) == [b"1"]


def test_archive_opened_once_per_read(tmp_path, monkeypatch):
    (tmp_path / "s.tar").write_bytes(tar_bytes(MEMBERS))
    (scene,) = discover_scenes(str(tmp_path))
    calls = []
    real = scenes_mod._open_archive
    monkeypatch.setattr(scenes_mod, "_open_archive", lambda *a: calls.append(1) or real(*a))
    assert len(read_scene_frames(scene)) == 3
    assert len(calls) == 1


def test_stride_max_include_exclude(tmp_path):
    files = {f"s{k}/img{i}.jpg": f"{k}{i}".encode() for k in range(3) for i in range(10)}
    put(fsspec.filesystem("file"), str(tmp_path), files)
    scenes = discover_scenes(str(tmp_path), frame_stride=3, max_frames=3)
    assert [s.scene_id for s in scenes] == ["s0", "s1", "s2"]
    assert [f.name for f in scenes[0].frames] == ["img0.jpg", "img3.jpg", "img6.jpg"]
    assert [f.frame_index for f in scenes[0].frames] == [0, 3, 6]
    assert len(discover_scenes(str(tmp_path), frame_stride=4)[1].frames) == 3  # 0, 4, 8
    assert [s.scene_id for s in discover_scenes(str(tmp_path), include=["s1", "s2"], exclude=["s2"])] == ["s1"]
    assert [s.scene_id for s in discover_scenes(str(tmp_path), exclude=["s*"])] == []
    with pytest.raises(ConfigError, match="frame_stride"):
        discover_scenes(str(tmp_path), frame_stride=0)
    with pytest.raises(ConfigError, match="max_frames"):
        discover_scenes(str(tmp_path), max_frames=-1)


def test_empty_scene_is_listed_and_fails_clearly(root):
    url, opts, fs, path = root
    put(fs, path, {"full/x.jpg": b"x", "empty/readme.txt": b"nothing"})
    scenes = {s.scene_id: s for s in discover_scenes(url, opts)}
    assert scenes["empty"].frames == ()
    with pytest.raises(SceneError, match="'empty' has no image frames"):
        read_scene_frames(scenes["empty"], opts)


def test_corrupt_and_missing_archives(root):
    url, opts, fs, path = root
    put(fs, path, {"bad.tar": b"this is not a tar archive" * 40, "bad2.zip": b"nope", "ok.tar": tar_bytes(MEMBERS),
                   "bad3.tar.gz": b"not gzip" * 40, "bad4.tar.gz": gzip.compress(tar_bytes(MEMBERS))[:-60]})
    scenes = {s.scene_id: s for s in discover_scenes(url, opts)}
    for sid in ("bad", "bad2", "bad3", "bad4"):  # not a tar, not a zip, not gzip, truncated gzip
        assert scenes[sid].frames == ()
        with pytest.raises(SceneError, match=f"'{sid}'.*{sid}\\.(tar|zip|tar\\.gz)"):
            read_scene_frames(scenes[sid], opts)
    fs.rm_file(f"{path}/ok.tar")
    fs.invalidate_cache()
    with pytest.raises(SceneError, match=r"'ok'.*ok\.tar.*not found"):
        read_scene_frames(scenes["ok"], opts)


def test_missing_frame_file_names_scene_and_file(root):
    url, opts, fs, path = root
    put(fs, path, {"s/1.jpg": b"1", "s/2.jpg": b"2"})
    (scene,) = discover_scenes(url, opts)
    fs.rm_file(f"{path}/s/2.jpg")
    fs.invalidate_cache()
    with pytest.raises(SceneError, match=r"'s'.*s/2\.jpg"):
        read_scene_frames(scene, opts)


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        discover_scenes(str(tmp_path / "nope"))
    put(fsspec.filesystem("file"), str(tmp_path / "r"), {"bad id/x.jpg": b"x"})
    with pytest.raises(ConfigError, match="'bad id'"):
        discover_scenes(str(tmp_path / "r"))
    put(fsspec.filesystem("file"), str(tmp_path / "d"), {"x/1.jpg": b"x", "x.tar": tar_bytes(MEMBERS)})
    with pytest.raises(ConfigError, match="twice"):
        discover_scenes(str(tmp_path / "d"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a manifest"):
        discover_scenes(str(tmp_path / "file.txt"))


def _manifest_bytes(fmt: str, rows: list[dict]) -> bytes:
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        return buf.getvalue()
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    cols = list(rows[0])
    lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_manifest_formats(root, fmt):
    url, opts, fs, path = root
    put(fs, path, {"imgs/p.jpg": b"p", "imgs/q.jpg": b"q", "imgs/r.jpg": b"r", "arc.tar": tar_bytes(MEMBERS)})
    abs_uri = f"{url}/imgs/r.jpg"
    rows = [
        {"scene_id": "m1", "uri": "imgs/q.jpg", "frame_index": 5},
        {"scene_id": "m2", "uri": abs_uri, "frame_index": 0},
        {"scene_id": "m1", "uri": "imgs/p.jpg", "frame_index": 2},
        {"scene_id": "m1", "uri": abs_uri, "frame_index": 9},
        {"scene_id": "m2", "uri": f"tar://f9.jpg::{url}/arc.tar", "frame_index": 1},
    ]
    put(fs, path, {f"man.{fmt}": _manifest_bytes(fmt, rows)})
    scenes = discover_scenes(f"{url}/man.{fmt}", opts)
    assert [(s.scene_id, s.kind) for s in scenes] == [("m1", "manifest"), ("m2", "manifest")]
    m1, m2 = scenes
    assert [f.frame_index for f in m1.frames] == [2, 5, 9]
    assert read_scene_frames(m1, opts) == [b"p", b"q", b"r"]
    assert read_scene_frames(m2, opts) == [b"r", b"t9"]
    assert m1.frames[0].uri == f"{url}/imgs/p.jpg"
    strided = discover_scenes(f"{url}/man.{fmt}", opts, frame_stride=2, include=["m1"])
    assert [f.frame_index for f in strided[0].frames] == [2, 9]


def test_manifest_without_frame_index_keeps_order_and_validates(tmp_path):
    for name in ("z.jpg", "a.jpg"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "m.jsonl").write_text('{"scene_id": "s", "uri": "z.jpg"}\n{"scene_id": "s", "uri": "a.jpg"}\n')
    (scene,) = discover_scenes(str(tmp_path / "m.jsonl"))
    assert [f.name for f in scene.frames] == ["z.jpg", "a.jpg"]
    assert [f.frame_index for f in scene.frames] == [0, 1]
    assert read_scene_frames(scene) == [b"z.jpg", b"a.jpg"]
    (tmp_path / "bad.csv").write_text("scene,uri\ns,a.jpg\n")
    with pytest.raises(ConfigError, match="scene_id"):
        discover_scenes(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.jsonl").write_text('{"scene_id": "s/../x", "uri": "a.jpg"}\n')
    with pytest.raises(ConfigError, match="s/../x"):
        discover_scenes(str(tmp_path / "bad.jsonl"))


def test_archive_versions_are_the_objects_versions(root):
    # taken from the root listing now: they must equal what a stat of the object says, or
    # every archive scene would look changed to a resume
    url, opts, fs, path = root
    make_dataset(fs, path)
    archives = [s for s in discover_scenes(url, opts) if s.kind != "folder"]
    assert len(archives) == 3
    fs.invalidate_cache()
    for scene in archives:
        assert scene.version == object_version(fs.info(get_fs(scene.source, opts)[1])), scene.scene_id


@pytest.mark.parametrize("listing", ["full", "without a change tag"])
def test_archive_versions_cost_no_stat_when_the_listing_has_them(monkeypatch, listing):
    fs = fsspec.filesystem("memory")
    base = f"/scenes-{uuid.uuid4().hex}"
    for i in range(5):
        fs.pipe_file(f"{base}/s{i}.tar", tar_bytes({f"f{i}.png": bytes([i])}))
    stats = []
    real_info, real_ls = type(fs).info, type(fs).ls
    monkeypatch.setattr(type(fs), "info", lambda self, p, **kw: stats.append(p) or real_info(self, p, **kw))
    if listing != "full":  # like an HTTP listing: names and types, no size or date
        monkeypatch.setattr(type(fs), "ls", lambda self, p, detail=True, **kw: [
            {"name": e["name"], "type": e["type"], "size": None} for e in real_ls(self, p, detail=True, **kw)])
    scenes = discover_scenes(f"memory://{base}")
    assert [s.scene_id for s in scenes] == [f"s{i}" for i in range(5)]
    archive_stats = [p for p in stats if p.endswith(".tar")]
    assert len(archive_stats) == (0 if listing == "full" else 5)
    listed = {e["name"]: e for e in real_ls(fs, base, detail=True)}
    for i, scene in enumerate(scenes):
        path = f"{base}/s{i}.tar"  # (memory's listing and info write the date differently)
        assert scene.version == object_version(listed[path] if listing == "full" else real_info(fs, path))
        assert scene.version.split(":")[1]  # a change tag, so a rewrite is seen
    fs.rm(base, recursive=True)


# --------------------------------------------------------------------------- manifest versions


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def vroot(request, tmp_path):
    """An empty input root, in memory too (see :func:`_input_root`)."""
    url, opts, fs, path = _input_root(request, tmp_path)
    yield url, opts, fs, path
    if request.param == "memory":
        fs.rm(path, recursive=True)


def rewrite(fs, path: str, data: bytes) -> None:
    """Rewrite a file in place (same URI); on local disk its mtime surely moves (a write within
    one clock tick of the last could keep it)."""
    fs.pipe_file(path, data)
    if is_local(fs):
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fs.invalidate_cache()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_manifest_fingerprint_sees_a_frame_rewritten_in_place(vroot):
    url, opts, fs, path = vroot
    put(fs, path, {"imgs/a/1.jpg": b"a1", "imgs/a/2.jpg": b"a2", "imgs/b/3.jpg": b"b3",
                   "arc.tar": tar_bytes(MEMBERS)})
    put(fs, path, {"man.jsonl": _jsonl([
        {"scene_id": "s", "uri": "imgs/a/1.jpg"}, {"scene_id": "s", "uri": "imgs/a/2.jpg"},
        {"scene_id": "t", "uri": "imgs/b/3.jpg"},
        {"scene_id": "u", "uri": f"tar://f9.jpg::{url}/arc.tar"}])})

    def prints() -> dict[str, str]:
        return {s.scene_id: scene_fingerprint(s) for s in discover_scenes(f"{url}/man.jsonl", opts)}

    first = prints()
    assert prints() == first  # unchanged input: the same fingerprints
    scenes = {s.scene_id: s for s in discover_scenes(f"{url}/man.jsonl", opts)}
    # each frame carries its file's version, as a folder scene's frames do
    folder = {f.name: f.version for s in discover_scenes(f"{url}/imgs", opts) for f in s.frames}
    assert [f.version for f in scenes["s"].frames] == [folder["1.jpg"], folder["2.jpg"]]
    assert scenes["t"].frames[0].version == folder["3.jpg"] != ""
    assert scenes["u"].frames[0].version.startswith(f"{len(tar_bytes(MEMBERS))}:")  # the archive's

    rewrite(fs, f"{path}/imgs/a/2.jpg", b"A2")  # same size, same URI, new content
    after = prints()
    assert after["s"] != first["s"] and after["t"] == first["t"] and after["u"] == first["u"]
    rewrite(fs, f"{path}/arc.tar", tar_bytes({**MEMBERS, "f9.jpg": b"T9"}))
    assert prints() == {**after, "u": prints()["u"]} and prints()["u"] != first["u"]


class _Calls:
    """Counts the ``ls`` / ``info`` calls filesystem ``fs`` gets, by path (fsspec form).
    Patched on the instance (fsspec hands out one cached instance per protocol and options;
    s3fs's sync methods are instance attributes)."""

    def __init__(self, monkeypatch, fs, fail_ls: frozenset[str] = frozenset()):
        self.ls: list[str] = []
        self.info: list[str] = []
        real_ls, real_info = fs.ls, fs.info

        def ls(p, *args, **kwargs):
            p = fs._strip_protocol(p).rstrip("/")
            self.ls.append(p)
            if p in fail_ls:
                raise PermissionError(f"listing {p} is not allowed")
            return real_ls(p, *args, **kwargs)

        def info(p, *args, **kwargs):
            if isinstance(p, str):  # LocalFileSystem.ls stats its entries with DirEntry objects
                self.info.append(fs._strip_protocol(p).rstrip("/"))
            return real_info(p, *args, **kwargs)

        monkeypatch.setattr(fs, "ls", ls)
        monkeypatch.setattr(fs, "info", info)


MANY = {"imgs/a/1.jpg": b"a1", "imgs/a/2.jpg": b"a2", "imgs/a/3.jpg": b"a3",
        "imgs/b/1.jpg": b"b1", "imgs/b/2.jpg": b"b2", "imgs/c/1.jpg": b"c1", "imgs/c/x.txt": b"no"}
MANY_ROWS = [{"scene_id": sid, "uri": f"imgs/{rel}"} for sid, rel in
             [("s", "a/1.jpg"), ("s", "a/2.jpg"), ("s", "b/1.jpg"),
              ("t", "a/3.jpg"), ("t", "b/2.jpg"), ("t", "c/1.jpg")]]


def test_manifest_versions_list_each_folder_once(vroot, monkeypatch):
    url, opts, fs, path = vroot
    put(fs, path, {**MANY, "man.csv": _manifest_bytes("csv", MANY_ROWS)})
    frames = {f"{path}/imgs/{r['uri'][5:]}" for r in MANY_ROWS}
    folders = {f"{path}/imgs/{d}" for d in "abc"}
    calls = _Calls(monkeypatch, fs)
    scenes = discover_scenes(f"{url}/man.csv", opts)
    assert sorted(p for p in calls.ls if p in folders) == sorted(folders)  # one listing each
    assert not [p for p in calls.info if p in frames]  # and no per-frame lookup
    assert all(f.version for s in scenes for f in s.frames)
    monkeypatch.undo()

    # b cannot be listed (an S3 prefix readable without ListBucket): its frames are looked up
    calls = _Calls(monkeypatch, fs, fail_ls=frozenset({f"{path}/imgs/b"}))
    fallback = discover_scenes(f"{url}/man.csv", opts)
    assert sorted(p for p in calls.info if p in frames) == [f"{path}/imgs/b/1.jpg", f"{path}/imgs/b/2.jpg"]
    assert all(f.version for s in fallback for f in s.frames)
    if not url.startswith("memory://"):  # memory's info() says "created" as a datetime, ls() as a float
        assert fallback == scenes


def test_missing_manifest_frame_still_fails_naming_it(vroot, caplog):
    url, opts, fs, path = vroot
    put(fs, path, {"imgs/a/1.jpg": b"a1", "man.jsonl": _jsonl([
        {"scene_id": "s", "uri": "imgs/a/1.jpg"}, {"scene_id": "s", "uri": "imgs/a/gone.jpg"},
        {"scene_id": "t", "uri": "imgs/nofolder/x.jpg"}])})
    s, t = discover_scenes(f"{url}/man.jsonl", opts)
    assert [bool(f.version) for f in s.frames] == [True, False] and t.frames[0].version == ""
    assert "1 manifest frame(s) in" in caplog.text and "cannot be found or read (gone.jpg)" in caplog.text
    with pytest.raises(SceneError, match=r"'s'.*imgs/a/gone\.jpg"):
        read_scene_frames(s, opts)
    with pytest.raises(SceneError, match=r"'t'.*imgs/nofolder/x\.jpg"):
        read_scene_frames(t, opts)


def test_rerun_redoes_a_rewritten_manifest_frame_and_old_outputs_once(tmp_path, caplog):
    """What the driver decides (``plan_work``): a committed manifest scene is redone when a
    frame was rewritten in place; one committed before frame versions counted (its fingerprint
    has the URIs only) is redone once, then skipped."""
    from httm_dist.cluster.plan import plan_work
    from httm_dist.config import load_config
    from httm_dist.results import ResultStore

    root, out = tmp_path / "in", tmp_path / "out"
    put(fsspec.filesystem("file"), str(root), {**MANY, "man.csv": _manifest_bytes("csv", MANY_ROWS)})
    cfg = load_config({"input": str(root / "man.csv"), "output": str(out),
                       "model": {"preset": "tiny", "allow_random_weights": True}})
    (out / "scenes").mkdir(parents=True)

    def commit(scene, fingerprint) -> None:
        record = {"scene_id": scene.scene_id, "status": "done", "model_hash": cfg.model_hash(),
                  "merge_hash": cfg.merge_hash(), "num_frames": len(scene.frames),
                  "input_fingerprint": fingerprint}
        (out / "scenes" / f"{scene.scene_id}.json").write_text(json.dumps(record))

    def todo() -> list[str]:
        return sorted({u.scene_id for u in plan_work(cfg, ResultStore(str(out), {}), "r").queue})

    scenes = discover_scenes(cfg.input)
    for scene in scenes:  # as the version before this one recorded them
        unversioned = tuple(dataclasses.replace(f, version="") for f in scene.frames)
        commit(scene, scene_fingerprint(dataclasses.replace(scene, frames=unversioned)))
    caplog.set_level(logging.WARNING, logger="httm_dist")
    assert todo() == ["s", "t"]  # redone once...
    assert "scene 's': its inputs changed since it was committed" in caplog.text
    for scene in scenes:
        commit(scene, scene_fingerprint(scene))
    assert todo() == []  # ...then skipped while nothing changes
    rewrite(fsspec.filesystem("file"), str(root / "imgs" / "c" / "1.jpg"), b"C1")
    assert todo() == ["t"]  # a frame of t rewritten in place


# --------------------------------------------------------------------------- manifest versions: HTTP, odd URLs


@pytest.fixture(params=["folders forbidden", "autoindex"])
def http_files(request, tmp_path):
    """``(base URL, served folder, server)`` of a local HTTP server in a thread
    (:func:`http_files.serve`), answering 403 for folders or serving index pages."""
    folder = tmp_path / "served"
    folder.mkdir()
    with serve(str(folder), forbid_folders=request.param == "folders forbidden") as (base, server):
        yield base, folder, server


def test_http_manifest_frames_are_versioned_without_listing_folders(http_files, tmp_path, monkeypatch):
    base, folder, server = http_files
    retries = []
    monkeypatch.setattr(storage.time, "sleep", retries.append)
    put(fsspec.filesystem("file"), str(folder), {"imgs/a/f0.png": b"a0", "imgs/a/f1.png": b"a1",
                                                "imgs/b/f2.png": b"b2"})
    rows = [{"scene_id": "s", "uri": f"{base}/imgs/a/f0.png"}, {"scene_id": "s", "uri": f"{base}/imgs/a/f1.png"},
            {"scene_id": "t", "uri": f"{base}/imgs/b/f2.png"}]
    (tmp_path / "m.csv").write_bytes(_manifest_bytes("csv", rows))

    def prints() -> dict[str, str]:
        return {s.scene_id: scene_fingerprint(s) for s in discover_scenes(str(tmp_path / "m.csv"))}

    s, t = discover_scenes(str(tmp_path / "m.csv"))
    assert not retries  # nothing refused was retried (a 403 used to be, then stopped the run)
    assert not [p for _, p in server.requests if not p.endswith(".png")]  # no folder asked for
    for frame in (*s.frames, *t.frames):  # size and Last-Modified, from a HEAD request
        lm = email.utils.formatdate(os.stat(folder / frame.uri[len(base) + 1:]).st_mtime, usegmt=True)
        assert frame.version == f"2:{lm}", frame.uri
    assert read_scene_frames(s) == [b"a0", b"a1"]

    first = prints()
    rewrite(fsspec.filesystem("file"), str(folder / "imgs/a/f1.png"), b"A1")  # same size, +1 s
    after = prints()
    assert after["s"] != first["s"] and after["t"] == first["t"]

    if server.forbid_folders:  # a frame the server refuses fails its own scene, at once
        rows.append({"scene_id": "u", "uri": f"{base}/imgs/a"})
        (tmp_path / "m.csv").write_bytes(_manifest_bytes("csv", rows))
        *_, u = discover_scenes(str(tmp_path / "m.csv"))
        assert u.frames[0].version == ""
        with pytest.raises(SceneError, match=r"'u'.*PermissionError: HTTP 403"):
            read_scene_frames(u)
        assert not retries


def test_http_frames_a_busy_server_refuses_once_get_their_versions(http_files, tmp_path, monkeypatch, caplog):
    """fsspec's HTTP info() raises FileNotFoundError from any failure (a 503 too): a frame the
    server is too busy to answer is retried, not versioned "" (and redone by the next run)."""
    base, folder, server = http_files
    retries = []
    monkeypatch.setattr(storage.time, "sleep", retries.append)
    files = {"imgs/a/f0.png": b"a0", "imgs/a/f1.png": b"a1", "imgs/b/f2.png": b"b2"}
    put(fsspec.filesystem("file"), str(folder), files)
    rows = [{"scene_id": f"s{n[5]}", "uri": f"{base}/{n}"} for n in files]
    (tmp_path / "m.csv").write_bytes(_manifest_bytes("csv", rows))
    calm = {s.scene_id: scene_fingerprint(s) for s in discover_scenes(str(tmp_path / "m.csv"))}
    assert not retries

    server.unavailable = {f"/{n}": 2 for n in files}  # one info() each: 503 to its HEAD and its GET
    caplog.set_level(logging.WARNING, logger="httm_dist")
    scenes = discover_scenes(str(tmp_path / "m.csv"))
    for frame in (f for s in scenes for f in s.frames):
        lm = email.utils.formatdate(os.stat(folder / frame.uri[len(base) + 1:]).st_mtime, usegmt=True)
        assert frame.version == f"2:{lm}", frame.uri
    assert len(retries) == 3 and not any(server.unavailable.values())
    assert {s.scene_id: scene_fingerprint(s) for s in scenes} == calm  # nothing redone
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "cannot be found" in w or "will fail" in w], warnings
    assert len(warnings) == 3 and all("attempt 1/5" in w and "503" in w for w in warnings), warnings

    server.unavailable = {"/imgs/a/f0.png": 10}  # still busy after every retry: the run stops
    with pytest.raises(StorageError, match=r"stat http://.*/imgs/a/f0\.png failed after 5 attempts: .*503"):
        discover_scenes(str(tmp_path / "m.csv"))


@pytest.mark.parametrize("http_files", ["autoindex"], indirect=True)
def test_http_archives_refused_or_busy(http_files, monkeypatch):
    """An archive the server refuses (403) fails its own scene, at discovery or when read, as
    a SceneError naming its URL once; one the server is briefly too busy for is retried."""
    base, folder, server = http_files
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    put(fsspec.filesystem("file"), str(folder), {"a.tar": tar_bytes(MEMBERS), "b.tar": tar_bytes(MEMBERS)})
    a, b = discover_scenes(base)
    url = f"{base}/a.tar"
    server.forbidden = {"/a.tar"}
    with pytest.raises(SceneError) as info:
        read_scene_frames(a)
    message = str(info.value)
    assert message == f"scene 'a': cannot read archive {url}: PermissionError: HTTP 403 Forbidden", message
    assert read_scene_frames(b) == [b"t1", b"t9", b"t10"]

    server.unavailable = {"/b.tar": 4}  # the listing's entry has no size: info() (HEAD, GET) asked
    a, b = discover_scenes(base)  # the refused archive fails its scene, not the discovery
    assert a.frames == () and a.error == f"scene 'a': cannot read tar archive {url}: PermissionError: HTTP 403 Forbidden"
    with pytest.raises(SceneError, match="PermissionError: HTTP 403"):
        read_scene_frames(a)
    size = os.stat(folder / "b.tar").st_size
    assert b.version == f"{size}:{email.utils.formatdate(os.stat(folder / 'b.tar').st_mtime, usegmt=True)}"
    assert read_scene_frames(b) == [b"t1", b"t9", b"t10"] and not any(server.unavailable.values())


@pytest.mark.parametrize("error, escapes", [(PermissionError("HTTP 403 Forbidden: u"), False),
                                            (FileNotFoundError("u"), False), (StorageError("down"), True)])
def test_an_archive_version_that_cannot_be_read(error, escapes, tmp_path, monkeypatch):
    """The archive's version lookup fails like its index: its scene, or (storage down) the run."""
    put(fsspec.filesystem("file"), str(tmp_path), {"a.tar": tar_bytes(MEMBERS), "b.tar": tar_bytes(MEMBERS)})

    def listed_version(fs, path, entry):
        if path.endswith("a.tar"):
            raise error
        return "v"

    monkeypatch.setattr(scenes_mod, "listed_version", listed_version)
    if escapes:
        with pytest.raises(StorageError):
            discover_scenes(str(tmp_path))
        return
    a, b = discover_scenes(str(tmp_path))
    assert a.frames == () and f"'a': cannot read tar archive {tmp_path}/a.tar: {type(error).__name__}" in a.error
    assert b.version == "v" and len(b.frames) == 3


def test_manifest_versions_survive_any_listing_failure(vroot, monkeypatch):
    # a listing that stays unreachable (StorageError after retries) means "cannot list" too
    url, opts, fs, path = vroot
    put(fs, path, {**MANY, "man.csv": _manifest_bytes("csv", MANY_ROWS)})
    scenes = discover_scenes(f"{url}/man.csv", opts)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    real_ls = fs.ls

    def ls(p, *args, **kwargs):
        if fs._strip_protocol(p).rstrip("/") == f"{path}/imgs/a":
            raise ConnectionError("connection reset")
        return real_ls(p, *args, **kwargs)

    monkeypatch.setattr(fs, "ls", ls)
    again = discover_scenes(f"{url}/man.csv", opts)
    assert all(f.version for s in again for f in s.frames)
    if not url.startswith("memory://"):  # memory's info() says "created" as a datetime, ls() as a float
        assert again == scenes


def test_manifest_frame_of_an_unknown_protocol_fails_only_its_scene(tmp_path, caplog):
    put(fsspec.filesystem("file"), str(tmp_path), {"imgs/1.jpg": b"a1"})
    (tmp_path / "m.jsonl").write_bytes(_jsonl([
        {"scene_id": "s", "uri": "imgs/1.jpg"},
        {"scene_id": "t", "uri": "s4://user:hunter2@bucket/x.png"},
        {"scene_id": "t", "uri": "s4://bucket/y/z.png"}]))
    with caplog.at_level(logging.WARNING, logger="httm_dist"):
        s, t = discover_scenes(str(tmp_path / "m.jsonl"))
    assert s.frames[0].version and [f.version for f in t.frames] == ["", ""]
    warned = [r.getMessage() for r in caplog.records if "s4://" in r.getMessage()]
    assert len(warned) == 1 and "s4://" in warned[0] and "1 more" in warned[0], warned
    assert "hunter2" not in caplog.text
    with pytest.raises(SceneError, match=r"'t'.*s4://"):
        read_scene_frames(t)
    assert read_scene_frames(s) == [b"a1"]


def test_remote_manifest_rows_are_joined_as_written(tmp_path):
    """Relative rows of a remote manifest holding ``//`` name keys as written (``x//y`` is its
    own S3 object), their ``.``/``..`` resolved as relative URLs, never above the bucket; every
    other row, remote or local (plain or ``file://`` manifests), keeps the spelling outputs
    recorded (normpath of the join), so outputs keep their fingerprints."""
    memory = fsspec.filesystem("memory")
    rows = {"x//y.png": "bucket/dir/x//y.png", "a/..//b.png": "bucket/dir//b.png",
            "../../x//d.png": "bucket/x//d.png"}
    for row, key in rows.items():
        assert manifest_mod.resolve_uri(row, "memory://bucket/dir/m.csv", memory) == f"memory://{key}", row
    for manifest in ("memory://bucket/dir/m.csv", "s3://bucket/m.csv", "https://host:8/d/../p//m.csv"):
        scheme, _, rest = manifest.partition("://")
        for row in ("./a/b.png", "a/./b.png", "../c.png", "a/../e.png", "../other-bucket/x.png"):
            before = posixpath.normpath(posixpath.join(posixpath.dirname(rest), row))  # as recorded
            assert manifest_mod.resolve_uri(row, manifest, memory) == f"{scheme}://{before}", (manifest, row)
    assert manifest_mod.resolve_uri("../b2/x.png", "s3://b/m.csv", memory) == "s3://b2/x.png"  # another bucket
    assert manifest_mod.resolve_uri("x//y.png", "https://host:8/p//m.csv", memory) == "https://host:8/p//x//y.png"
    assert manifest_mod.resolve_uri("/abs//k.png", "memory://bucket/dir/m.csv", memory) == "memory://abs//k.png"
    local = fsspec.filesystem("file")
    for manifest in (f"{tmp_path}/dir/m.csv", f"file://{tmp_path}/dir/m.csv"):
        prefix = "file://" if manifest.startswith("file://") else ""
        for row in ("x//y.png", "./a/b.png", "../c.png", "a/../e.png"):
            before = os.path.normpath(os.path.join(f"{tmp_path}/dir", row))  # as outputs recorded them
            assert manifest_mod.resolve_uri(row, manifest, local) == prefix + before, (manifest, row)


def test_manifest_calls_get_fs_once_per_folder(tmp_path, monkeypatch):
    put(fsspec.filesystem("file"), str(tmp_path), {**MANY, "man.csv": _manifest_bytes("csv", MANY_ROWS)})
    calls = []
    real = manifest_mod.get_fs
    monkeypatch.setattr(manifest_mod, "get_fs", lambda u, o=None: calls.append(u) or real(u, o))
    scenes = discover_scenes(str(tmp_path / "man.csv"))
    assert len(calls) == 3 and all(f.version for s in scenes for f in s.frames)  # imgs/a, b, c


def test_locate_gives_what_get_fs_gives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s3 = {"key": "AKIAEXAMPLEKEY000000", "secret": "s3cr3t", "client_kwargs": {"region_name": "us-east-1"}}
    urls = [f"{tmp_path}/a/1.png", f"{tmp_path}/a/2.png", "a/3.png", "a/4.png", "5.png", "6.png",
            f"{tmp_path}//a/./10.png", f"{tmp_path}//a/./11.png", "b/../a/12.png", "b/../a/13.png",
            f"file://{tmp_path}/a/7.png", "memory://m/a/8.png", "memory://m/a/9.png",
            "s3://bucket/a/1.png", "s3://bucket/a/2.png", "s3://bucket/a/3.png?versionId=v1",
            "https://host/a/1.png?X-Amz-Credential=AKIA/2026/s3&X-Amz-Signature=ab", "https://host/a/2.png",
            "s4://bucket/a/1.png"]
    for opts in (None, s3):
        located = manifest_mod._locate(urls, opts)
        assert located.pop("s4://bucket/a/1.png") is None
        for url, (fs, path) in located.items():
            want_fs, want_path = get_fs(url, opts)
            assert fs is want_fs and path == want_path, url


@pytest.mark.parametrize("entry", [None, {"size": None, "type": "file"}, {"size": 2, "type": "file"}])
def test_listed_version_asks_info_only_when_the_entry_cannot_tell(entry, tmp_path, monkeypatch):
    fs, path = get_fs(str(tmp_path / "f.png"))
    fs.pipe_file(path, b"ab")
    asked = []
    real_info = fs.info
    monkeypatch.setattr(fs, "info", lambda p, **kw: asked.append(p) or real_info(p, **kw))
    good = fs.ls(str(tmp_path), detail=True)[0]
    asked.clear()
    assert listed_version(fs, path, good) == object_version(good) and asked == []  # no request
    assert listed_version(fs, path, entry) == object_version(real_info(path)) and asked == [path]


def test_object_versions_of_existing_storages_do_not_change():
    # committed outputs keep their input_fingerprint only if these strings stay the same
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    http_date = "Fri, 02 Jan 2026 03:04:05 GMT"
    cases = [
        ({"name": "b/k", "size": 5, "type": "file", "ETag": '"9b2c"', "LastModified": when,  # s3fs
          "StorageClass": "STANDARD", "VersionId": None, "ContentType": "image/png"}, '5:"9b2c"'),
        ({"Key": "b/k", "LastModified": when, "ETag": '"9b2c"', "Size": 5, "size": 5,  # s3fs ls
          "name": "b/k", "type": "file"}, '5:"9b2c"'),
        ({"name": "b/k", "size": 5, "type": "file", "etag": "CKih16E=", "md5Hash": "m5==",  # gcsfs
          "updated": "2026-01-02T03:04:05.000Z", "generation": "1"}, "5:CKih16E="),
        ({"name": "b/k", "size": 5, "type": "file", "md5Hash": "m5==",
          "updated": "2026-01-02T03:04:05.000Z"}, "5:m5=="),
        ({"name": "/x", "size": 5, "type": "file", "created": 1.5, "islink": False,  # local
          "mode": 33188, "mtime": 1767323045.25, "ino": 7, "nlink": 1}, "5:1767323045.25"),
        ({"name": "/x", "size": 5, "type": "file", "created": when}, "5:2026-01-02 03:04:05+00:00"),
        ({"name": "c/k", "size": 5, "type": "file", "etag": '"0x8D"', "last_modified": when}, '5:"0x8D"'),
        ({"name": "u", "size": 5, "type": "file", "ETag": '"h"', "Last-Modified": http_date}, '5:"h"'),
        ({"name": "u", "size": 5, "type": "file", "Last-Modified": http_date}, f"5:{http_date}"),  # new
        ({"name": "u", "size": None, "type": "file"}, "None:"),  # an HTTP server telling nothing
    ]
    assert [object_version(info) for info, _ in cases] == [want for _, want in cases]


def _spellings_dataset(tmp_path):
    """``(base, scenes)``: a folder scene, a tar scene and a manifest over them under
    ``base/in``, for the same files given through different spellings of their path."""
    base = tmp_path / "w"
    put(fsspec.filesystem("file"), str(base / "in" / "scenes"),
        {"s0/f0.png": b"a", "s0/f1.png": b"b", "t.tar": tar_bytes(MEMBERS)})
    rows = [{"scene_id": "m", "uri": "scenes/s0/f0.png"}, {"scene_id": "m", "uri": "./scenes//s0/../s0/f1.png"},
            {"scene_id": "n", "uri": f"{base}/in/./scenes/s0/f0.png"},
            {"scene_id": "n", "uri": f"file://{base}/in/scenes/s0/../s0/f1.png"},
            {"scene_id": "n", "uri": f"tar://f9.jpg::{base}/in//scenes/t.tar"}]
    (base / "in" / "man.csv").write_bytes(_manifest_bytes("csv", rows))
    (base / "cwd").mkdir()
    return base


def _uris(scenes) -> list:
    return [(s.scene_id, s.source, [f.uri for f in s.frames], scene_fingerprint(s)) for s in scenes]


def test_an_absolute_normal_path_keeps_its_uris(tmp_path):
    """Outputs committed before paths were normalised keep their fingerprints: a plain absolute
    path gives exactly the URIs it gave then (the path joined with each file's relative path)."""
    base = _spellings_dataset(tmp_path)
    root = f"{base}/in/scenes"
    s0, t = discover_scenes(root)
    assert s0.source == f"{root}/s0"
    assert [f.uri for f in s0.frames] == [f"{root}/s0/f0.png", f"{root}/s0/f1.png"]
    assert t.source == f"{root}/t.tar"
    assert [f.uri for f in t.frames] == [f"tar://{m}::{root}/t.tar" for m in ORDER_ARCHIVE]
    m, _ = discover_scenes(f"{base}/in/man.csv")  # relative rows were normalised already
    assert [f.uri for f in m.frames] == [f"{root}/s0/f0.png", f"{root}/s0/f1.png"]
    (same,) = discover_scenes(_write_manifest(base, [f"{root}/s0/f0.png", f"file://{root}/s0/f1.png",
                                                     f"tar://f9.jpg::{root}/t.tar"]))
    assert [f.uri for f in same.frames] == [f"{root}/s0/f0.png", f"file://{root}/s0/f1.png",
                                            f"tar://f9.jpg::{root}/t.tar"]


def _write_manifest(base, uris: list[str]) -> str:
    path = base / "in" / "one.jsonl"
    path.write_bytes(_jsonl([{"scene_id": "n", "uri": u} for u in uris]))
    return str(path)


def test_manifest_rows_naming_local_files_oddly_get_one_spelling(tmp_path):
    """Absolute, ``file://`` and chained rows with ``.``, ``..`` or ``//`` name their files as
    plain normal paths would (a ``file://`` row keeps its scheme: outputs of manifests written
    that way keep their fingerprints); remote rows are kept as written."""
    base = _spellings_dataset(tmp_path)
    root = f"{base}/in/scenes"
    _, n = discover_scenes(f"{base}/in/man.csv")
    assert [f.uri for f in n.frames] == [f"{root}/s0/f0.png", f"file://{root}/s0/f1.png",
                                         f"tar://f9.jpg::{root}/t.tar"]
    (remote,) = manifest_mod.manifest_scenes(
        fsspec.filesystem("file"), _write_manifest(base, ["s3://b/a/../x.png", "gs://b/a//./y.png"]), "m")
    assert [f.uri for f in remote.frames] == ["s3://b/a/../x.png", "gs://b/a//./y.png"]


@pytest.mark.parametrize("spelling", ["../in/scenes", "./../in/scenes/", "{base}//in/./scenes",
                                      "{base}/cwd/../in/scenes/", "file://../in/scenes",
                                      "file://{base}/in/../in/scenes"])
def test_the_same_files_through_any_local_spelling_give_the_same_fingerprints(tmp_path, monkeypatch, spelling):
    """A rerun given the same input as ``../x`` (or with ``.``, ``//``, a trailing ``/``,
    ``file://``) plans nothing new: frame URIs and fingerprints are those of the plain path."""
    base = _spellings_dataset(tmp_path)
    expected = _uris(discover_scenes(f"{base}/in/scenes"))
    monkeypatch.chdir(base / "cwd")
    assert _uris(discover_scenes(spelling.format(base=base))) == expected
    kept = discover_scenes(spelling.format(base=base), ignore=["../in/./scenes/s0/"])
    assert [s.scene_id for s in kept] == ["t"]
    man = spelling.format(base=base).rstrip("/").replace("scenes", "man.csv")
    assert _uris(discover_scenes(man)) == _uris(discover_scenes(f"{base}/in/man.csv"))


def test_a_rerun_through_a_relative_path_skips_what_is_done(tmp_path, monkeypatch):
    """The reported case, as the driver plans it: committed through an absolute path, rerun
    through ``../``: nothing to do."""
    from httm_dist.cluster.plan import plan_work
    from httm_dist.config import load_config
    from httm_dist.results import ResultStore

    base = _spellings_dataset(tmp_path)
    out = base / "out"
    (out / "scenes").mkdir(parents=True)

    def cfg_for(input_url):
        return load_config({"input": input_url, "output": str(out),
                            "model": {"preset": "tiny", "allow_random_weights": True}})

    cfg = cfg_for(f"{base}/in/scenes")
    for scene in discover_scenes(cfg.input):
        record = {"scene_id": scene.scene_id, "status": "done", "model_hash": cfg.model_hash(),
                  "merge_hash": cfg.merge_hash(), "num_frames": len(scene.frames),
                  "input_fingerprint": scene_fingerprint(scene)}
        (out / "scenes" / f"{scene.scene_id}.json").write_text(json.dumps(record))
    monkeypatch.chdir(base / "cwd")
    plan = plan_work(cfg_for("../in//scenes/"), ResultStore("../out", {}), "r")
    assert [u.scene_id for u in plan.queue] == []


def _records(caplog, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "httm_dist.data.scenes" and r.levelno == level and text in r.getMessage()]


def test_files_that_are_not_frames_are_counted_in_one_line_for_the_whole_input(tmp_path, caplog):
    """A large archive must not log a line per scene: one INFO line sums every scene's
    skipped files (commonest extensions first), the count of each scene goes to DEBUG."""
    files = {f"s{i:02d}/f.png": b"x" for i in range(12)}
    files.update({f"s{i:02d}/depth/f.npy": b"x" for i in range(10)})
    files.update({f"s{i:02d}/cameras.json": b"x" for i in range(3)})
    files.update({"s00/a.txt": b"x", "s00/b.csv": b"x", "s00/c.xyz": b"x", "s00/README": b"x"})
    put(fsspec.filesystem("file"), str(tmp_path / "in"), {**files, "t.tar": tar_bytes(MEMBERS)})
    caplog.set_level(logging.DEBUG, logger="httm_dist.data.scenes")
    assert len(discover_scenes(str(tmp_path / "in"))) == 13
    (line,) = _records(caplog, logging.INFO, "not images")
    assert line == ("skipped 18 files that are not images Pillow reads in 11 of 13 scenes (10 .npy, 3 .json, "
                    "1 (no suffix), 1 .csv and 3 other kinds); -v counts them per scene")
    per_scene = _records(caplog, logging.DEBUG, "not images")
    assert len(per_scene) == 11
    assert "scene 's00': skipped 6 files that are not images Pillow reads (1 (no suffix), 1 .csv, 1 .json, 1 .npy" \
        " and 2 other kinds)" in per_scene
    assert "scene 't': skipped 1 files that are not images Pillow reads (1 .md)" in per_scene


def test_root_files_that_are_not_scenes_are_named_once(tmp_path, caplog):
    """Files beside the scenes are ignored, but said so in one line; one that could be a
    manifest gets a warning saying how to read it (as the input itself)."""
    root = tmp_path / "in"
    put(fsspec.filesystem("file"), str(root), {"a/f.png": b"x", "notes.txt": b"x", "LICENSE": b"x", "_SUCCESS": b"",
                                                 ".DS_Store": b"x", "e.tgz": b"x"})
    caplog.set_level(logging.INFO, logger="httm_dist.data.scenes")
    discover_scenes(str(root))
    assert _records(caplog, logging.INFO, "not scenes") == [
        f"ignoring 2 files under {root} that are not scenes (LICENSE, notes.txt); scenes are folders or .tar, "
        ".tar.gz, .zip archives"]
    caplog.clear()
    for i in range(5):
        (root / f"x{i}.txt").write_bytes(b"x")
    (root / "frames.csv").write_bytes(b"scene_id,uri\n")
    discover_scenes(str(root))
    assert _records(caplog, logging.INFO, "not scenes") == []
    assert _records(caplog, logging.WARNING, "not scenes") == [
        f"ignoring 8 files under {root} that are not scenes (LICENSE, frames.csv, notes.txt, x0.txt, ...); a "
        f"manifest is read only when it is the input itself: set input to {root}/frames.csv to read frames.csv"]


def test_a_json_file_beside_the_scenes_gets_no_manifest_advice(tmp_path, caplog):
    """Only .parquet/.csv/.jsonl are manifests: a transforms.json beside the scenes is named at
    INFO like any other file, not advised as an input (that input would be refused)."""
    root = tmp_path / "in"
    put(fsspec.filesystem("file"), str(root), {"a/f.png": b"x", "transforms.json": b"{}"})
    caplog.set_level(logging.INFO, logger="httm_dist.data.scenes")
    discover_scenes(str(root))
    assert _records(caplog, logging.WARNING, "not scenes") == []
    assert _records(caplog, logging.INFO, "not scenes") == [
        f"ignoring 1 files under {root} that are not scenes (transforms.json); scenes are folders or .tar, "
        ".tar.gz, .zip archives"]
    with pytest.raises(ConfigError, match="is a file but not a manifest"):  # what the advice led to
        discover_scenes(str(root / "transforms.json"))


def test_a_root_read_as_one_scene_counts_its_other_files_as_the_scenes(tmp_path, caplog):
    put(fsspec.filesystem("file"), str(tmp_path / "shot"), {"f.png": b"x", "notes.txt": b"x"})
    caplog.set_level(logging.INFO, logger="httm_dist.data.scenes")
    discover_scenes(str(tmp_path / "shot"))
    assert _records(caplog, logging.INFO, "not scenes") == []
    assert _records(caplog, logging.INFO, "not images") == [
        "scene 'shot': skipped 1 files that are not images Pillow reads (1 .txt)"]
