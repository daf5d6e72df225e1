"""Malformed or edited manifests are one sentence naming the JSON path (issue 11, item 7)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from ccat.data import manifest_schema, open_dataset, spec
from ccat.data.reader import DatasetError
from conftest import run_cli

FIX = "; rebuild the dataset or restore its manifest.json"


@pytest.fixture()
def real(built: Path) -> dict[str, Any]:
    """The tiny CREMA-D build's manifest, as the builder wrote it."""
    return json.loads((built / spec.MANIFEST_NAME).read_text())


def write(tmp_path: Path, manifest: Any = None, text: str | None = None) -> Path:
    folder = tmp_path / "ds"
    folder.mkdir(exist_ok=True)
    (folder / spec.MANIFEST_NAME).write_text(text if text is not None else json.dumps(manifest))
    return folder


def edited(manifest: dict[str, Any], change: Callable[[dict[str, Any]], None],
           refingerprint: bool = True) -> dict[str, Any]:
    result = copy.deepcopy(manifest)
    change(result)
    if refingerprint:  # a hand-made manifest whose fingerprint is right, so the schema decides
        try:
            result["fingerprint"] = spec.compute_fingerprint(result)
        except (KeyError, TypeError, AttributeError):
            pass  # so malformed that no fingerprint can be computed: the schema refuses it
    return result


def test_every_real_build_manifest_is_valid(built: Path, real: dict[str, Any]) -> None:
    assert manifest_schema.first_error(real) is None
    assert spec.load_manifest(built) == real


CASES = {
    "modalities as a list": (lambda m: m.update(modalities=list(m["modalities"].values())),
                             "modalities: is an array, not an object"),
    "splits as a list": (lambda m: m.update(splits=list(m["splits"].values())),
                         "splits: is an array, not an object"),
    "a shard without sha256": (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"),
                               "splits.train.shards[0]: 'sha256' is a required property"),
    "classes as a string": (lambda m: m.update(classes="ANGDISFEAHAPNEUSAD"),
                            "classes: 'ANGDISFEAHAPNEUSAD' is a string, not an array"),
    "spec_version as a string": (lambda m: m.update(spec_version=str(m["spec_version"])),
                                 "spec_version: '1' is a string, not an integer".replace(
                                     "1", str(spec.SPEC_VERSION))),
    "a missing key": (lambda m: m.pop("skipped"), "top level: 'skipped' is a required property"),
    "an extra key": (lambda m: m.update(notes="x"),
                     "top level: Additional properties are not allowed ('notes' was unexpected)"),
    "an extra key in a shard": (lambda m: m["splits"]["val"]["shards"][1].update(url="x"),
                                "splits.val.shards[1]: Additional properties are not allowed"),
    "a count as a string": (lambda m: m["splits"]["test"].update(num_samples="6"),
                            "splits.test.num_samples: '6' is a string, not an integer"),
    "a frame size below 1": (lambda m: m["modalities"]["video"].update(size=0),
                             "modalities.video.size: 0 is less than the minimum of 1"),
    "a spectrogram without a shape": (lambda m: m["modalities"]["audio"].pop("shape"),
                                      "modalities.audio: 'shape' is a required property"),
    "an unknown kind": (lambda m: m["modalities"]["audio"].update(kind="wave"),
                        "modalities.audio.kind: 'wave' is not one of"),
    "a bad sha256": (lambda m: m["splits"]["train"]["shards"][0].update(sha256="abc"),
                     "splits.train.shards[0].sha256: 'abc' does not match"),
    "nesting 40 deep": (lambda m: m["sources"]["build"].update(x=json.loads("[" * 40 + "]" * 40)),
                        "sources.build.x[0]"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_malformed_manifest_is_one_sentence_naming_the_path(
        real: dict[str, Any], tmp_path: Path, capsys, case: str) -> None:
    change, says = CASES[case]
    folder = write(tmp_path, edited(real, change))
    where = folder / spec.MANIFEST_NAME
    with pytest.raises(spec.SpecError) as refused:
        spec.load_manifest(folder)
    message = str(refused.value)
    assert message.startswith(f"{where}: {says}") and message.endswith(FIX), message
    assert "\n" not in message
    code, _, err = run_cli(["info", folder], capsys)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


COUNT_FIELDS = {
    "splits.train.shards[0].num_samples": lambda m, v: m["splits"]["train"]["shards"][0].update(
        num_samples=v),
    "splits.train.shards[1].bytes": lambda m, v: m["splits"]["train"]["shards"][1].update(bytes=v),
    "splits.test.num_samples": lambda m, v: m["splits"]["test"].update(num_samples=v),
    "splits.val.class_counts[2]": lambda m, v: m["splits"]["val"]["class_counts"].__setitem__(2, v),
    "sources.raw.num_files": lambda m, v: m["sources"]["raw"].update(num_files=v),
    "modalities.video.size": lambda m, v: m["modalities"]["video"].update(size=v),
    "modalities.audio.shape[1]": lambda m, v: m["modalities"]["audio"]["shape"].__setitem__(1, v),
}
BAD_COUNTS = [10**30, 2**40 + 1, -(10**30), -1, 16.0, 1e30, float("nan"), float("inf"), True,
              False, "16", None, [16], {"n": 16}]


@pytest.mark.parametrize("field", COUNT_FIELDS)
def test_a_count_that_is_not_a_sane_integer_is_one_sentence_from_the_schema(
        real: dict[str, Any], tmp_path: Path, field: str) -> None:
    """Every count, size and shape: huge, negative, a float (even 16.0), a boolean, a string,
    null or a container is refused by the schema, naming the field, before anything is
    sized by it."""
    for value in BAD_COUNTS:
        folder = write(tmp_path, edited(real, lambda m: COUNT_FIELDS[field](m, value)))
        with pytest.raises(spec.SpecError) as refused:
            spec.load_manifest(folder)
        message = str(refused.value)
        assert message.startswith(f"{folder / spec.MANIFEST_NAME}: {field}: "), (value, message)
        assert message.endswith(FIX) and "\n" not in message and len(message) < 400


def test_a_manifest_that_is_not_an_object(tmp_path: Path) -> None:
    folder = write(tmp_path, [{"spec_version": spec.SPEC_VERSION}])
    with pytest.raises(spec.SpecError, match=f"^{folder / spec.MANIFEST_NAME}: top level: is an "
                       "array, not an object; rebuild"):
        spec.load_manifest(folder)


def test_100k_levels_of_nesting_are_one_sentence_not_a_recursion_error(tmp_path: Path,
                                                                      capsys) -> None:
    folder = write(tmp_path, text='{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(spec.SpecError, match="nests too deeply to be read as JSON"):
        spec.load_manifest(folder)
    code, _, err = run_cli(["verify", folder], capsys)
    assert code == 1 and "nests too deeply" in err


def test_an_older_spec_version_says_to_rebuild(real: dict[str, Any], tmp_path: Path) -> None:
    old = spec.SPEC_VERSION - 1
    folder = write(tmp_path, edited(real, lambda m: m.update(spec_version=old), False))
    with pytest.raises(spec.SpecError, match=f"is spec version {old}, this toolkit reads version "
                       f"{spec.SPEC_VERSION}; rebuild the shards with this version of ccat-data"):
        spec.load_manifest(folder)


def test_an_edited_parameter_with_the_old_fingerprint_is_refused(real: dict[str, Any],
                                                                tmp_path: Path) -> None:
    folder = write(tmp_path, edited(real, lambda m: m["modalities"]["audio"].update(seconds=20),
                                    refingerprint=False))
    with pytest.raises(DatasetError, match=re.escape(
            "manifest edited after build: its fingerprint does not match its contents; "
            "rebuild or restore it")):
        open_dataset(folder)


def test_class_counts_must_count_the_classes(real: dict[str, Any], tmp_path: Path) -> None:
    folder = write(tmp_path, edited(real, lambda m: m["splits"]["train"]["class_counts"].pop()))
    with pytest.raises(spec.SpecError, match="splits.train.class_counts .* does not count 12 "
                       "samples over 6 classes"):
        spec.load_manifest(folder)


def test_spec_v2_requires_the_identity_hashes(real: dict[str, Any]) -> None:
    """Checked on the schema itself, so it holds whichever version this toolkit writes."""
    v2 = edited(real, lambda m: m.update(spec_version=manifest_schema.IDENTITY_SINCE), False)
    for entry in v2["splits"].values():
        entry["membership_sha256"] = "2" * 64
    v2["sources"]["raw"] = {"num_files": 48, "sha256": "3" * 64}
    assert manifest_schema.first_error(v2) is None
    no_membership = edited(v2, lambda m: m["splits"]["val"].pop("membership_sha256"), False)
    assert manifest_schema.first_error(no_membership) == (
        "splits.val: 'membership_sha256' is a required property")
    no_raw = edited(v2, lambda m: m["sources"].pop("raw"), False)
    assert manifest_schema.first_error(no_raw) == "sources: 'raw' is a required property"
    v2_blake3 = edited(v2, lambda m: m["sources"].update(raw={"num_files": 48, "blake3": "4" * 64}),
                       False)
    assert manifest_schema.first_error(v2_blake3) is None  # the digest names its algorithm
    for raw in ({"num_files": 48}, {"num_files": 48, "sha256": "3" * 64, "blake3": "4" * 64}):
        assert manifest_schema.first_error(
            edited(v2, lambda m: m["sources"].update(raw=raw), False)).startswith("sources.raw: ")
    bad_raw = edited(v2, lambda m: m["sources"]["raw"].update(num_files="48"), False)
    assert manifest_schema.first_error(bad_raw) == (
        "sources.raw.num_files: '48' is a string, not an integer")


def test_a_local_manifest_over_the_cap_is_refused_unread(tmp_path: Path) -> None:
    folder = write(tmp_path, text="")
    with open(folder / spec.MANIFEST_NAME, "wb") as f:
        f.truncate(spec.MANIFEST_MAX_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(spec.SpecError, match="is over 64 MB, far larger than any manifest"):
        spec.load_manifest(folder)


def test_ccat_train_refuses_classes_given_as_a_string(real: dict[str, Any], built: Path,
                                                       tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    """The issue's case: 'ANGDISFEAHAPNEUSAD' trained an 18-class head and exited 0."""
    from ccat.cli import main

    folder = write(tmp_path, edited(real, lambda m: m.update(classes="ANGDISFEAHAPNEUSAD")))
    for shard in built.glob("*.tar"):
        (folder / shard.name).write_bytes(shard.read_bytes())
    config = tmp_path / "c.yaml"
    config.write_text("method: {name: sum}\noptim: {epochs: 1}\n")
    monkeypatch.setattr("sys.argv", ["ccat", "train", "--config", str(config), "--data",
                                     str(folder), "--out", str(tmp_path / "run"),
                                     "--set", "device=cpu"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    err = " ".join(capsys.readouterr().err.split())  # rich wraps the sentence at 80 columns
    assert exit_.value.code != 0 and "Traceback" not in err
    assert "classes: 'ANGDISFEAHAPNEUSAD' is a string, not an array" in err
    assert not (tmp_path / "run" / "last.pt").exists()
