"""Ensemble stage on synthetic probability stores (no trained models): tuning, voting, bias, memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core.config import build_config
from pipeline.core.errors import PipelineError
from pipeline.data import load_coco
from pipeline.data.resize import resize_nearest
from pipeline.data.store import ProbReader, ProbWriter
from pipeline.ensemble import EnsembleConfig, run
from pipeline.ensemble import main as ensemble_main
from pipeline.evaluation.metrics import confusion_matrix, mean_iou
from pipeline.inference import ensemble as ens
from pipeline.inference.ensemble import Fusion, OofCache, find_member, resolve_members
from pipeline.submission.rle import decode_label_map
from pipeline.submit import SubmitConfig
from pipeline.submit import run as submit


def noisy_probs(
    labels: np.ndarray, k: int, margin: float, rng: np.random.Generator, shift: dict[int, float] | None = None
) -> np.ndarray:
    """Softmax of ``margin * one-hot(labels) + N(0, 1)`` (+ ``shift[c]`` on class c's logit):
    K x h x w probabilities."""
    logits = rng.normal(size=(k, *labels.shape)).astype(np.float32)
    logits += margin * (np.arange(k)[:, None, None] == labels[None])
    for c, v in (shift or {}).items():
        logits[c] += np.float32(v)
    e = np.exp(logits - logits.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def write_member(
    root: Path,
    coco,
    test_coco,
    margin: float,
    seed: int,
    tta: str = "flip",
    k_folds: int = 2,
    scale: float = 0.5,
    shift: dict[int, float] | None = None,
) -> Path:
    """runs/<exp>/fold<k>/{oof, test_<tta>}: OOF = noisy ground truth at ``scale`` x the image size."""
    rng = np.random.default_rng(seed)
    ids = coco.image_ids
    for f in range(k_folds):
        fold = root / f"fold{f}"
        with ProbWriter(fold / "oof", coco.class_names) as w:
            for image_id in ids[f::k_folds]:
                im = coco.image(image_id)
                h, wd = int(im["height"]), int(im["width"])
                size = (max(1, round(h * scale)), max(1, round(wd * scale)))
                gt = resize_nearest(coco.mask(image_id), size)
                w.write(image_id, im["file_name"], h, wd, noisy_probs(gt, coco.num_classes, margin, rng, shift))
        with ProbWriter(fold / f"test_{tta}", coco.class_names) as w:
            for im in test_coco.images:
                h, wd = int(im["height"]), int(im["width"])
                size = (max(1, round(h * scale)), max(1, round(wd * scale)))
                labels = rng.integers(0, coco.num_classes, size=size)
                w.write(int(im["id"]), im["file_name"], h, wd, noisy_probs(labels, coco.num_classes, margin, rng))
    return root


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    """(data_dir, good run, bad run) of the non-square demo data."""
    root = tmp_path_factory.mktemp("ens_runs")
    coco = load_coco(demo_data, "train_all.json")
    test = load_coco(demo_data, "test.json", require_annotations=False)
    good = write_member(root / "good", coco, test, margin=2.5, seed=1)
    bad = write_member(root / "bad", coco, test, margin=0.6, seed=2)
    return demo_data, good, bad


def submit_t(tmp_path: Path, data, out: str) -> dict:
    """Submit ensemble ``t`` of ``tmp_path/ensembles`` into ``tmp_path/<out>``."""
    return submit(
        SubmitConfig(
            name="t",
            ensembles_dir=str(tmp_path / "ensembles"),
            data_dir=str(data),
            out_dir=str(tmp_path / out),
            progress=False,
        )
    )


def cfg_for(members, tmp_path: Path, **kw) -> EnsembleConfig:
    data, good, bad = members
    base = dict(
        runs=f"{good} {bad}",
        data_dir=str(data),
        out_dir=str(tmp_path / "ensembles"),
        name="t",
        n_trials=25,
        progress=False,
    )
    base.update(kw)
    return build_config(EnsembleConfig, overrides=base)


def test_members_resolve_folds_tta_and_fold_folders(runs, tmp_path):
    _, good, _ = runs
    m = find_member(str(good))
    assert m.name == "good" and m.tta == "flip"
    assert m.oof_stores == [str(good / "fold0" / "oof"), str(good / "fold1" / "oof")]  # no oof_flip: plain oof
    assert m.test_stores == [str(good / "fold0" / "test_flip"), str(good / "fold1" / "test_flip")]
    fold = find_member(str(good / "fold1"))
    assert fold.name == "good/fold1" and fold.oof_stores == [str(good / "fold1" / "oof")]
    twice = resolve_members([f"{good} {good}"])
    assert [x.name for x in twice] == ["good", "good#2"]
    with pytest.raises(PipelineError, match="no fold"):
        find_member(str(tmp_path))


def test_fold_folders_of_one_experiment_form_one_member(runs, tmp_path):
    """RUNS="runs/a/fold0 runs/a/fold1" (the make help example): one member whose OOF covers both
    folds, as RUNS=runs/a gives; an ensemble of the two folds as two members would share no image."""
    data, good, bad = runs
    grouped = resolve_members([f"{good / 'fold0'} {good / 'fold1'} {bad}"])
    assert [m.name for m in grouped] == ["good", "bad"]
    whole = find_member(str(good))
    assert grouped[0].oof_stores == whole.oof_stores and grouped[0].test_stores == whole.test_stores
    assert [m.name for m in resolve_members([str(good / "fold1")])] == ["good/fold1"]
    result = run(cfg_for(runs, tmp_path, runs=f"{good / 'fold0'} {good / 'fold1'} {bad / 'fold0'} {bad / 'fold1'}"))
    assert {m["name"] for m in result["members"]} == {"good", "bad"}


def test_ambiguous_tta_needs_a_choice(runs, tmp_path):
    data, good, _ = runs
    exp = tmp_path / "exp" / "fold0"
    exp.mkdir(parents=True)
    for name in ("oof", "test_flip", "test_d4"):
        (exp / name).symlink_to(good / "fold0" / ("test_flip" if name != "oof" else "oof"))
    with pytest.raises(PipelineError, match="several TTA stores.*d4, flip"):
        find_member(str(exp.parent))
    assert find_member(str(exp.parent), tta="d4").test_stores == [str(exp / "test_d4")]


def test_tta_none_on_the_command_line_names_the_stores_without_tta(runs, tmp_path):
    """``tta=none`` is the TTA called none (``oof_none``/``test_none``), not "pick the only one":
    with hflip stores beside them the ensemble and submit stages still find them."""
    data, good, _ = runs
    exp = tmp_path / "exp"
    for f in ("fold0", "fold1"):
        (exp / f).mkdir(parents=True)
        for name in ("oof_none", "oof_hflip"):
            (exp / f / name).symlink_to(good / f / "oof")
        for name in ("test_none", "test_hflip"):
            (exp / f / name).symlink_to(good / f / "test_flip")
    argv = [f"runs={exp}", f"data_dir={data}", f"out_dir={tmp_path / 'ens'}", "name=n", "progress=false"]
    assert ensemble_main([*argv, "tta=none", "n_trials=2"]) == 0
    saved = yaml.safe_load((tmp_path / "ens" / "n" / "weights.yaml").read_text())
    assert saved["members"][0]["test_stores"] == [str(exp / f / "test_none") for f in ("fold0", "fold1")]
    assert ensemble_main([*argv, "n_trials=2"]) == 2  # tta=auto: two candidates, the error names them


def test_tuning_prefers_the_good_member_and_beats_it(runs, tmp_path):
    data, good, bad = runs
    result = run(cfg_for(runs, tmp_path))
    members = {m["name"]: m for m in result["members"]}
    assert members["good"]["weight"] > members["bad"]["weight"]
    assert sum(result["weights"]) == pytest.approx(1.0)
    assert members["good"]["oof_miou"] > members["bad"]["oof_miou"]
    oof = result["oof"]
    assert oof["n_images"] == 24
    assert oof["ensemble_miou"] >= members["good"]["oof_miou"]
    assert oof["ensemble_miou"] >= oof["plain_average_miou"]
    assert 0 < oof["plain_average_miou"] < 1
    assert set(oof["iou_per_class"]) == set(result["class_names"])

    # the member scores equal an independent computation from the stores at the stored size
    coco = load_coco(data, "train_all.json")
    cm = np.zeros((coco.num_classes,) * 2, dtype=np.int64)
    for store in members["good"]["oof_stores"]:
        reader = ProbReader(store)
        for image_id in reader.image_ids:
            p = reader.load(image_id).numpy()
            q = np.rint(p * 255)  # the cache holds probabilities quantised to 1/255
            cm += confusion_matrix(q.argmax(0), resize_nearest(coco.mask(image_id), p.shape[1:]), coco.num_classes)
    assert members["good"]["oof_miou"] == pytest.approx(mean_iou(cm))

    folder = tmp_path / "ensembles" / "t"
    saved = yaml.safe_load((folder / "weights.yaml").read_text())
    assert [m["name"] for m in saved["members"]] == ["good", "bad"]
    assert saved["weights"] == result["weights"] and saved["method"] == "mean" and saved["bias"] is None
    assert saved["members"][0]["test_stores"] == [str(good / "fold0" / "test_flip"), str(good / "fold1" / "test_flip")]
    report = (folder / "report.md").read_text()
    assert "plain average" in report and "Per-class IoU" in report and "good" in report
    assert not list(folder.glob(".oof-cache-*"))  # the OOF cache is removed


def test_weights_yaml_is_reused_by_submit(runs, tmp_path):
    data, good, bad = runs
    result = run(cfg_for(runs, tmp_path, n_trials=8))
    out = submit_t(tmp_path, data, "subs")
    assert out["ensemble"] == str(tmp_path / "ensembles" / "t" / "weights.yaml")
    assert [m["weight"] for m in out["members"]] == pytest.approx(result["weights"])
    assert out["oof"]["ensemble_miou"] == pytest.approx(result["oof"]["ensemble_miou"])
    # the CSV holds argmax(sum_m w_m * mean_folds(p)) at each image's size
    test = load_coco(data, "test.json", require_annotations=False)
    rows = (tmp_path / "subs" / "t.csv").read_text().splitlines()[1:]
    by_image: dict[str, dict[int, str]] = {}
    for line in rows:
        name, cid, rle = line.split(",")
        by_image.setdefault(name, {})[test.cat_to_index[int(cid)]] = rle
    readers = [[ProbReader(s) for s in m["test_stores"]] for m in result["members"]]
    for im in test.images:
        h, w = int(im["height"]), int(im["width"])
        acc = sum(
            wt * np.mean([r.load(im["id"], (h, w)).numpy() for r in rs], axis=0)
            for wt, rs in zip(result["weights"], readers, strict=False)
        )
        np.testing.assert_array_equal(decode_label_map(by_image[im["file_name"]], (h, w)), acc.argmax(0))


def test_hard_voting(runs, tmp_path):
    result = run(cfg_for(runs, tmp_path, method="vote", n_trials=10))
    members = {m["name"]: m for m in result["members"]}
    assert result["method"] == "vote"
    assert result["oof"]["ensemble_miou"] >= max(m["oof_miou"] for m in members.values())
    assert yaml.safe_load((tmp_path / "ensembles" / "t" / "weights.yaml").read_text())["method"] == "vote"


def test_vote_counts_weighted_votes_not_probabilities():
    confident = np.array([0.0, 1.0, 0.0], np.float32)[:, None]  # votes 1, very sure
    unsure = np.array([0.05, 0.45, 0.5], np.float32)[:, None]  # votes 2
    members = [confident, unsure, unsure]
    assert Fusion([1, 1, 1], method="mean")(members)[0] == 1  # mean probability favours class 1
    assert Fusion([1, 1, 1], method="vote")(members)[0] == 2  # two votes against one
    assert Fusion([0.6, 0.2, 0.2], method="vote")(members)[0] == 1  # the heavier voter wins
    assert Fusion([0.5, 0.25, 0.25], method="vote")(members)[0] == 1  # a tie goes to the higher mean probability
    # the bias acts on log-probabilities of each voter
    assert Fusion([1, 1, 1], bias=[0, 0, -1.0], method="vote")(members)[0] == 1


def test_mean_with_bias_on_log_probabilities():
    p = np.array([[0.5, 0.2], [0.3, 0.7], [0.2, 0.1]], np.float32)  # K=3, two pixels
    assert Fusion([1]).__call__([p]).tolist() == [0, 1]
    bias = [0.0, np.log(0.5 / 0.3) + 0.01, 0.0]
    assert Fusion([1], bias=bias)([p]).tolist() == [1, 1]
    assert Fusion([1], bias=[0.0, 0.0, 0.0]).bias is None
    with pytest.raises(PipelineError, match="unknown ensemble method"):
        Fusion([1], method="median")
    with pytest.raises(PipelineError, match="not all zero"):
        Fusion([0, 0])


def test_bias_tuning_does_not_lower_oof_miou(runs, tmp_path):
    plain = run(cfg_for(runs, tmp_path / "a", n_trials=10))
    biased = run(cfg_for(runs, tmp_path / "b", n_trials=10, tune_bias=True, bias_range=0.5))
    assert biased["oof"]["ensemble_miou"] >= plain["oof"]["ensemble_miou"]
    assert biased["weights"] == plain["weights"]  # same seed: the weight stage is identical
    assert biased["bias"] is None or len(biased["bias"]) == len(biased["class_names"])
    assert biased["tuning"]["trials"] == 10  # the bias is tuned by coordinate ascent, not by trials
    (row,) = [c for c in biased["selection"]["comparisons"] if c["candidate"].endswith("+ bias")]
    assert row["estimate"].startswith("cross-fitted")
    assert (biased["bias"] is not None) == row["accepted"]


def test_a_member_under_confident_on_one_class_gets_a_bias_that_cross_fits(demo_data, tmp_path):
    """Class 2's logit is lowered by 2.5 everywhere: its pixels mostly lose the argmax.  The tuned
    bias raises it back, and the gain holds on the held-out half of the images."""
    coco = load_coco(demo_data, "train_all.json")
    test = load_coco(demo_data, "test.json", require_annotations=False)
    member = write_member(tmp_path / "shy", coco, test, margin=3.0, seed=3, shift={2: -2.5})
    cfg = dict(runs=str(member), data_dir=str(demo_data), out_dir=str(tmp_path / "ens"), progress=False)
    plain = run(build_config(EnsembleConfig, overrides={**cfg, "name": "plain"}))
    biased = run(build_config(EnsembleConfig, overrides={**cfg, "name": "bias", "tune_bias": True}))
    assert plain["bias"] is None
    (row,) = [c for c in biased["selection"]["comparisons"] if c["candidate"].endswith("+ bias")]
    assert row["accepted"] and row["low"] > 0, row
    assert biased["bias"][2] >= 1.5 and biased["bias"][0] == 0.0
    assert biased["oof"]["iou_per_class"]["Paper"] > plain["oof"]["iou_per_class"]["Paper"] + 0.2
    assert biased["oof"]["ensemble_miou"] > plain["oof"]["ensemble_miou"]


def test_no_tuning_is_the_best_member_unless_the_plain_average_is_surely_better(runs, tmp_path):
    result = run(cfg_for(runs, tmp_path, tune=False))
    assert result["tuning"]["trials"] == 0
    best = max(m["oof_miou"] for m in result["members"])
    (row,) = result["selection"]["comparisons"]  # the best single member against the plain average
    assert (row["current"], row["candidate"]) == ("member good alone", "plain average")
    expected = result["oof"]["plain_average_miou"] if row["accepted"] else best
    assert result["oof"]["ensemble_miou"] == pytest.approx(expected)
    assert row["accepted"] == (row["low"] > 0)


def test_per_image_confusions_sum_to_the_confusions(runs, tmp_path):
    data, good, bad = runs
    coco = load_coco(data, "train_all.json")
    members = resolve_members([str(good), str(bad)])
    with OofCache(members, coco, folder=tmp_path, max_images=9, progress=False) as cache:
        fusions = [Fusion([0.7, 0.3]), Fusion([0, 1])]
        per_image = cache.per_image_confusions(fusions)
        totals = cache.confusions(fusions)
        assert [p.shape for p in per_image] == [(9, coco.num_classes, coco.num_classes)] * 2
        for p, total in zip(per_image, totals, strict=True):
            np.testing.assert_array_equal(p.sum(axis=0), total)
        # image j of the array is image_ids[j]: its pixel count is its stored size
        sizes = [cache.sizes[i][0] * cache.sizes[i][1] for i in cache.image_ids]
        gt_pixels = per_image[1].sum(axis=(1, 2))
        assert (gt_pixels <= np.array(sizes)).all() and gt_pixels.sum() > 0


def test_report_and_weights_record_intervals_selection_and_shakeup(runs, tmp_path):
    result = run(cfg_for(runs, tmp_path, n_trials=10, n_boot=300, shakeup_splits=200, public_share=0.4))
    saved = yaml.safe_load((tmp_path / "ensembles" / "t" / "weights.yaml").read_text())
    oof = saved["oof"]
    for iv in [oof["ensemble_interval"], oof["plain_average_interval"]] + [
        m["oof_miou_interval"] for m in saved["members"]
    ]:
        assert set(iv) == {"point", "low", "high"} and iv["low"] <= iv["point"] <= iv["high"]
    assert oof["ensemble_interval"]["point"] == pytest.approx(oof["ensemble_miou"])
    assert saved["members"][0]["oof_miou_interval"]["point"] == pytest.approx(saved["members"][0]["oof_miou"])
    selection = saved["selection"]
    assert selection["candidates"] == ["member good alone", "plain average", "tuned weights"]
    assert selection["n_boot"] == 300 and selection["level"] == 0.9 and selection["seed"] == 0
    first = selection["comparisons"][0]
    assert (first["current"], first["candidate"]) == ("member good alone", "plain average")
    for c in selection["comparisons"]:
        assert c["accepted"] == (c["gain"] > 0 and c["low"] > 0)
    assert selection["chosen"] == oof["chosen"] == result["oof"]["chosen"]
    shake = saved["shakeup"]
    assert shake["test_images"] == 6 and (shake["public_images"], shake["private_images"]) == (2, 4)  # test.json
    assert "test.json" in shake["test_images_from"] and shake["public_share"] == 0.4 and shake["n_splits"] == 200
    assert 0 <= shake["abs_gap"]["low"] <= shake["abs_gap"]["point"] <= shake["abs_gap"]["high"]
    report = (tmp_path / "ensembles" / "t" / "report.md").read_text()
    assert "| OOF mIoU | 90% interval |" in report and "## Selection" in report and "## Leaderboard shake-up" in report
    assert "| current choice | candidate | OOF gain | 90% interval | accepted |" in report
    assert f"| member good alone | plain average | {selection['comparisons'][0]['gain']:+.4f} |" in report
    assert "6 test images (2 public, 4 private)" in report
    ens = oof["ensemble_interval"]
    assert f"| {ens['point']:.4f} | [{ens['low']:.4f}, {ens['high']:.4f}] |" in report


def test_a_tie_keeps_the_simplest_candidate_and_test_size_falls_back_to_the_config(runs, tmp_path):
    data, good, _ = runs
    result = run(
        cfg_for(runs, tmp_path, runs=f"{good} {good}", n_trials=5, n_boot=200, test_ann="none.json", test_images=10)
    )
    comparisons = result["selection"]["comparisons"]
    assert [c["candidate"] for c in comparisons] == ["plain average", "tuned weights"]
    assert all(c["gain"] == 0 and c["low"] == c["high"] == 0 and not c["accepted"] for c in comparisons)
    assert result["oof"]["chosen"] == "member good alone" and result["weights"] == [1.0, 0.0]
    assert result["shakeup"]["test_images"] == 10 and result["shakeup"]["test_images_from"] == "config test_images=10"
    with pytest.raises(PipelineError, match="n_boot"):
        cfg_for(runs, tmp_path, n_boot=0)
    with pytest.raises(PipelineError, match="public_share"):
        cfg_for(runs, tmp_path, public_share=1.5)


def test_max_images_subsamples_with_a_seed(runs, tmp_path):
    a = run(cfg_for(runs, tmp_path / "a", tune=False, max_images=7))
    b = run(cfg_for(runs, tmp_path / "b", tune=False, max_images=7))
    assert a["oof"]["n_images"] == 7 and a["oof"]["plain_average_miou"] == b["oof"]["plain_average_miou"]


def test_errors_name_the_problem(runs, tmp_path):
    data, good, _ = runs
    with pytest.raises(PipelineError, match="runs is required"):
        build_config(EnsembleConfig, overrides={"data_dir": str(data)})
    with pytest.raises(PipelineError, match="method: unknown 'median'; known: mean, vote"):
        cfg_for(runs, tmp_path, method="median")
    with pytest.raises(PipelineError, match="not found"):
        run(cfg_for(runs, tmp_path, runs=str(tmp_path / "nope")))


def test_main_accepts_a_space_separated_runs_list(runs, tmp_path):
    data, good, bad = runs
    rc = ensemble_main(
        [f"runs={good} {bad}", f"data_dir={data}", f"out_dir={tmp_path}", "name=m", "n_trials=3", "progress=false"]
    )
    assert rc == 0
    assert len(yaml.safe_load((tmp_path / "m" / "weights.yaml").read_text())["members"]) == 2


def test_peak_memory_of_a_tuning_pass_does_not_grow_with_the_images(runs, tmp_path, monkeypatch):
    """Streaming: a pass over the OOF cache allocates one chunk's worth, whatever the number of images."""
    data, good, bad = runs
    coco = load_coco(data, "train_all.json")
    monkeypatch.setattr(ens, "CHUNK_PIXELS", 2 * 32 * 48)  # two OOF maps per chunk
    members = resolve_members([str(good), str(bad)])
    peaks = []
    for n in (6, 12, 24):
        with OofCache(members, coco, folder=tmp_path, max_images=n, progress=False) as cache:
            assert len(cache.image_ids) == n
            assert Path(cache.path).stat().st_size == n * 32 * 48 * (1 + 2 * coco.num_classes)
            tracemalloc.start()
            cache.confusion(Fusion([0.7, 0.3]))
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    assert max(peaks) < 1.25 * min(peaks), peaks


@pytest.mark.parametrize("name", ["min_area", "crf"])
def test_post_processing_is_tuned_on_oof_recorded_and_applied_by_submit(runs, tmp_path, name):
    import yaml

    data = runs[0]
    result = run(cfg_for(runs, tmp_path, n_trials=4, postprocess=name, n_boot=200))
    post = yaml.safe_load((tmp_path / "ensembles" / "t" / "postprocess.yaml").read_text())
    assert post == result["postprocess"] and post["name"] in ("none", name)
    gain = post["oof_gain"]
    assert post["accepted"] == (gain["low"] > 0) and (post["name"] == name) == post["accepted"]
    assert post["oof_miou_with"] - post["oof_miou_without"] == pytest.approx(gain["gain"], abs=1e-9)
    out = submit_t(tmp_path, data, "subs")
    assert out["postprocess"]["name"] == post["name"]
    plain = submit(
        SubmitConfig(
            name="p",
            ensemble=str(tmp_path / "ensembles" / "t" / "weights.yaml"),
            postprocess="none",
            data_dir=str(data),
            out_dir=str(tmp_path / "subs"),
            progress=False,
        )
    )
    assert plain["postprocess"] == {"name": "none"}
    same = (tmp_path / "subs" / "t.csv").read_bytes() == (tmp_path / "subs" / "p.csv").read_bytes()
    assert same == (post["name"] == "none")  # applied exactly when chosen (and it changes some pixel)


def test_several_post_processors_are_tuned_and_one_is_kept_by_the_rule_simplest_first(runs, tmp_path):
    import yaml

    result = run(cfg_for(runs, tmp_path, n_trials=4, postprocess="min_area,crf", n_boot=200))
    post = yaml.safe_load((tmp_path / "ensembles" / "t" / "postprocess.yaml").read_text())
    assert post == result["postprocess"] and post["name"] in ("none", "min_area", "crf")
    tried = post["tried"]
    assert [t["candidate"] for t in tried] == ["min_area", "crf"] and tried[0]["current"] == "none"
    # each is compared with the choice so far; the last accepted one is kept
    assert tried[1]["current"] == ("min_area" if tried[0]["accepted"] else "none")
    accepted = [t["candidate"] for t in tried if t["accepted"]]
    assert post["name"] == (accepted[-1] if accepted else "none")
    with pytest.raises(Exception, match="postprocess: unknown 'nope'"):
        build_config(EnsembleConfig, overrides=["runs=runs/x", "postprocess=min_area,nope"])


def test_a_new_post_processor_is_one_registry_entry(runs, tmp_path, monkeypatch):
    """What a new post-processor module holds (here a fill-holes step) is all it takes: the ensemble
    stage tunes it by name, the selection rule decides, submit applies it; nothing else is edited."""
    from scipy.ndimage import binary_fill_holes

    from pipeline.inference.postprocessing import POSTPROCESSORS, PostProcessor, Tuned

    def fill_holes(params, labels, probs=None, image=None):
        out = labels.copy()
        for c in np.unique(labels):
            if c:
                inside = binary_fill_holes(labels == c) & (labels != c)
                out[inside] = c
        return out

    def tune(oof, k, seed):
        maps = oof.label_maps()
        cms = [
            np.stack([confusion_matrix(f(lab), gt, k) for lab, gt in maps])
            for f in (lambda x: x, lambda x: fill_holes({}, x))
        ]
        return Tuned({}, *cms)

    monkeypatch.setattr(POSTPROCESSORS, "_entries", dict(POSTPROCESSORS._entries))  # registered for this test only
    POSTPROCESSORS.add("fill_holes", PostProcessor("fill_holes", "holes take their class", tune, fill_holes), "holes")
    data = runs[0]
    post = run(cfg_for(runs, tmp_path, n_trials=4, postprocess="fill_holes", n_boot=200))["postprocess"]
    assert post["name"] in ("none", "fill_holes") and post["accepted"] == (post["name"] == "fill_holes")
    assert post["oof_miou_with"] - post["oof_miou_without"] == pytest.approx(post["oof_gain"]["gain"], abs=1e-9)
    forced = dict(post, name="fill_holes")  # applied by submit whatever the rule chose, to see it reach submit
    (tmp_path / "ensembles" / "t" / "postprocess.yaml").write_text(yaml.safe_dump(forced))
    out = submit_t(tmp_path, data, "s")
    assert out["postprocess"]["name"] == "fill_holes"
    with pytest.raises(PipelineError, match="unknown 'nope'"):
        build_config(EnsembleConfig, overrides=["runs=runs/x", "postprocess=nope"])


def test_the_weights_file_is_a_typed_record_that_writes_back_byte_for_byte(runs, tmp_path):
    from pipeline.core.records import EnsembleRecord

    run(cfg_for(runs, tmp_path, n_trials=3, n_boot=100))
    path = tmp_path / "ensembles" / "t" / "weights.yaml"
    record = EnsembleRecord.read(path)
    assert [m.name for m in record.members] and record.weights == yaml.safe_load(path.read_text())["weights"]
    assert Fusion.of(record).method == record.method and record.oof["n_images"] > 0
    again = record.write(tmp_path / "again.yaml")
    assert again.read_bytes() == path.read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text("members:\n  - {name: a}\n")
    with pytest.raises(PipelineError, match=r"bad\.yaml: member 1 lacks name, weight or test_stores"):
        EnsembleRecord.read(bad)
    with pytest.raises(PipelineError, match=r"nope\.yaml: ensemble weights file not found"):
        EnsembleRecord.read(tmp_path / "nope.yaml")


def test_greedy_selection_adds_members_with_replacement_and_is_a_candidate(runs, tmp_path):
    data, good, bad = runs
    coco = load_coco(data, "train_all.json")
    members = resolve_members([str(good), str(bad)])
    with OofCache(members, coco, folder=tmp_path, progress=False) as cache:
        weights, scored = ens.greedy_weights(cache, "mean", 6)
        singles = [mean_iou(cache.confusion(Fusion(np.eye(2)[i]))) for i in range(2)]
        greedy = mean_iou(cache.confusion(Fusion(weights)))
    best = int(np.argmax(singles))
    assert weights.sum() == pytest.approx(1.0) and scored % 2 == 0 and 2 <= scored <= 12
    assert greedy >= max(singles) - 1e-12 and weights[best] >= weights[1 - best]  # never below its first pick
    result = run(cfg_for(runs, tmp_path, n_trials=0, greedy_rounds=6, n_boot=100))
    names = result["selection"]["candidates"]
    assert names[:2] == [f"member {members[best].name} alone", "plain average"]
    assert ("greedy selection" in names) == (np.count_nonzero(weights) > 1 and not np.allclose(weights, 0.5))
    with pytest.raises(PipelineError, match="greedy_rounds must be >= 0"):
        cfg_for(runs, tmp_path, greedy_rounds=-1)
