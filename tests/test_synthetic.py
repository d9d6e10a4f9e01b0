import json
from dataclasses import replace

import av

from edgefed.common.data.clip_manifest import read_manifest
from edgefed.simulations.synthetic import LABELS, generate
from tests.conftest import SMALL_SPEC


def test_same_seed_gives_byte_identical_manifests(tmp_path):
    spec = replace(SMALL_SPEC, num_clips=8)
    a = generate(tmp_path / "a", spec)
    b = generate(tmp_path / "b", spec)
    generate(tmp_path / "c", replace(spec, seed=spec.seed + 1))
    assert a.read_bytes() == b.read_bytes()
    truth_a = json.loads((tmp_path / "a" / "dataset.json").read_text())["clips"]
    truth_c = json.loads((tmp_path / "c" / "dataset.json").read_text())["clips"]
    assert truth_a == json.loads((tmp_path / "b" / "dataset.json").read_text())["clips"]
    assert truth_a != truth_c  # the seed matters


def test_files_decode_with_the_promised_streams(small_dataset):
    truth = {c["video"]: c for c in json.loads((small_dataset.parent / "dataset.json").read_text())["clips"]}
    entries = read_manifest(small_dataset)
    assert len(entries) == SMALL_SPEC.num_clips
    assert {e.label for e in entries} == set(LABELS) and len(LABELS) >= 4
    silent = 0
    for entry in entries:
        with av.open(str(entry.path)) as container:
            video = container.streams.video[0]
            assert video.codec_context.name == "h264"
            assert (video.codec_context.width, video.codec_context.height) == (SMALL_SPEC.width, SMALL_SPEC.height)
            frames = sum(1 for _ in container.decode(video))
            assert frames == round(SMALL_SPEC.fps * SMALL_SPEC.duration_s)
        with av.open(str(entry.path)) as container:
            has_audio = bool(container.streams.audio)
            assert has_audio == truth[entry.video]["has_audio"]
            if has_audio:
                stream = container.streams.audio[0]
                assert stream.codec_context.name == "aac"
                assert sum(f.samples for f in container.decode(stream)) > SMALL_SPEC.sample_rate
            else:
                silent += 1
    assert 0 < silent < len(entries)  # some clips have no audio track, most do


def test_existing_dataset_is_reused(tmp_path):
    spec = replace(SMALL_SPEC, num_clips=4)
    manifest = generate(tmp_path, spec)
    stamp = manifest.stat().st_mtime_ns
    generate(tmp_path, spec)
    assert manifest.stat().st_mtime_ns == stamp
