"""Export -> decode -> same model; refine never exceeds its tolerance."""

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from moecomp.cli import app
from moecomp.codec import read_mcz
from moecomp.errors import ConfigError, RunError
from moecomp.export import export_solution
from moecomp.refine import refine
from moecomp.solution import student_model
from moecomp.train import accuracy


def test_export_decodes_to_the_in_memory_solution(run_ctx, tmp_path):
    r = export_solution(run_ctx, 1, out=tmp_path / "s1.mcz", safetensors=True)
    sol = run_ctx.solution(1)
    decoded = read_mcz(r.mcz)
    for k, v in sol.state.items():
        assert torch.equal(decoded.state_dict[k], v), k
    memory = student_model(run_ctx.target.teacher, sol.state)
    assert r.test_metric == accuracy(memory, run_ctx.target.test)
    assert r.file_bytes == r.mcz.stat().st_size
    assert r.ratio == pytest.approx(r.fp32_bytes / r.file_bytes)
    assert r.ratio > 5
    assert r.plan_json.read_text().count("sparsity") == 3


def test_unknown_solution_is_a_clear_error(run_ctx):
    with pytest.raises(RunError, match="no solution 99"):
        run_ctx.solution(99)
    with pytest.raises(RunError, match="no refined solution r42"):
        run_ctx.solution("r42")
    with pytest.raises(RunError, match="search id"):
        run_ctx.solution("best")


@pytest.mark.parametrize("tolerance", [0.0, 1.0])
def test_refine_never_exceeds_tolerance(run_ctx, tolerance):
    r = refine(run_ctx, 0, merge=True, tolerance=tolerance, metric="accuracy", progress=False)
    assert r.fidelity_after <= r.fidelity_before + tolerance + 1e-9
    assert all(r.levels_after[n] <= r.levels_before[n] for n in r.levels_before)
    assert [o.step for o in r.steps] == ["merge"] and r.steps[0].kept == r.merged
    # the stored solution is what was measured, on the validation split
    assert r.fidelity_split == "validation"
    sol = run_ctx.solution(r.key)
    model = student_model(run_ctx.target.teacher, sol.state)
    teacher_acc = accuracy(run_ctx.target.teacher, run_ctx.target.val)
    assert teacher_acc - accuracy(model, run_ctx.target.val) == pytest.approx(r.fidelity_after)
    assert sol.parent == "0" and r.root == "0"
    assert r.file_bytes == (run_ctx.run.path / "refined" / f"{r.key}.mcz").stat().st_size


def test_refine_with_finetuning_keeps_masks(run_ctx):
    r = refine(run_ctx, 2, finetune_epochs=1, progress=False)
    parent, child = run_ctx.solution(2), run_ctx.solution(r.key)
    for n, ql in parent.layers.items():
        assert torch.equal(ql.mask, child.layers[n].mask)
        assert child.layers[n].n_levels <= 2 ** parent.plan.layers[n].bits
    rows = run_ctx.run.path / "refined.csv"
    assert rows.is_file() and r.key in rows.read_text()


def test_refine_with_moving_masks_ends_at_the_plans_counts(run_ctx):
    r = refine(run_ctx, 2, finetune_epochs=1, masks="gradual", progress=False)
    parent, child = run_ctx.solution(2), run_ctx.solution(r.key)
    (step,) = r.steps
    assert step.step == "finetune" and "masks gradual" in step.note
    for n, ql in parent.layers.items():  # the survivors moved, their number did not
        assert int(child.layers[n].mask.sum()) == int(ql.mask.sum())
    moved = any(not torch.equal(ql.mask, child.layers[n].mask)
                for n, ql in parent.layers.items())
    assert moved == step.kept  # a kept step is the distillation's own masks


def test_refine_with_repaired_masks_says_how_many_moved(run_ctx):
    r = refine(run_ctx, 2, finetune_epochs=1, repair_masks=True, progress=False)
    (step,) = r.steps
    moved = int(step.note.split("masks fixed, ")[1].split(" survivor")[0])
    parent, child = run_ctx.solution(2), run_ctx.solution(r.key if step.kept else 2)
    changed = sum(int((ql.mask & ~child.layers[n].mask).sum()) for n, ql in parent.layers.items())
    assert changed == (moved if step.kept else 0)
    for n, ql in parent.layers.items():
        assert int(child.layers[n].mask.sum()) == int(ql.mask.sum())


def test_moving_masks_need_finetuning(run_ctx):
    with pytest.raises(ConfigError, match="repair_masks"):
        refine(run_ctx, 2, reconstruct=True, repair_masks=True, progress=False)
    with pytest.raises(ConfigError, match="masks"):
        refine(run_ctx, 2, reconstruct=True, masks="rigl", progress=False)
    with pytest.raises(ConfigError, match="masks"):
        refine(run_ctx, 2, finetune_epochs=1, masks="sideways", progress=False)


def test_refine_drops_a_step_that_makes_validation_worse(run_ctx):
    import pandas as pd

    # a learning rate far too large: the fine-tuned student is much worse on validation
    r = refine(run_ctx, 0, finetune_epochs=1, lr=50.0, progress=False)
    (step,) = r.steps
    assert step.step == "finetune" and not step.kept and step.after > step.before
    assert "worse" in step.note and not r.finetuned
    assert r.fidelity_after == r.start_measure == step.before
    parent, child = run_ctx.solution(0), run_ctx.solution(r.key)
    for n, ql in parent.layers.items():  # stored as it was
        assert torch.equal(ql.dequantize(), child.layers[n].dequantize())
    row = pd.read_csv(run_ctx.run.path / "refined.csv").set_index("key").loc[r.key]
    assert row["finetune"] == "dropped" and row["reconstruct"] != "kept"
    assert "finetune: dropped" in row["steps"]

    # a step kept is one that does not make validation worse; a refined solution's lineage
    # goes back to the searched one
    again = refine(run_ctx, r.key, reconstruct=True, calibration=256, progress=False)
    (rec,) = again.steps
    assert rec.kept == (rec.after <= rec.before) and again.reconstructed == rec.kept
    assert again.fidelity_after <= again.start_measure
    assert again.parent == r.key and again.root == "0"


def test_cli_refine_reports_kept_and_dropped_steps(run_ctx, cli, one_line_error):
    run = str(run_ctx.run.path)
    code, out, err = cli("refine", run, "--solution", "0", "--finetune-epochs", "1",
                         "--lr", "50", "--merge-bins")
    assert code == 0, err
    assert "finetune: dropped" in out and "worse" in out
    assert "merge: " in out and "bytes on disk" in out
    # the drops with their standard errors, as refined.csv has them
    row = pd.read_csv(run_ctx.run.path / "refined.csv").iloc[-1]
    said = " ".join(out.split())
    assert (f"drop val {row['val_drop']:.2f} +- {row['val_drop_se']:.2f} points, test "
            f"{row['test_drop']:.2f} +- {row['test_drop_se']:.2f} points") in said, out
    assert row["val_drop_se"] > 0
    code, _, err = cli("refine", run, "--solution", "0")
    one_line_error(code, err, "no step asked")
    code, _, err = cli("refine", run, "--solution", "0", "--reconstruct", "--tolerance", "1")
    one_line_error(code, err, "--tolerance", "--merge-bins")
    code, _, err = cli("refine", run, "--solution", "0", "--finetune-epochs", "1",
                       "--optimizer", "sgd", "--lr", "0")
    one_line_error(code, err, "--lr", "> 0")
    code, _, err = cli("refine", run, "--solution", "0", "--finetune-epochs", "1",
                       "--optimizer", "rmsprop")
    one_line_error(code, err, "--optimizer", "adam, sgd")
    # a run that diverges is a step dropped and said so, not a traceback
    code, out, err = cli("refine", run, "--solution", "0", "--finetune-epochs", "1",
                         "--optimizer", "sgd", "--lr", "1e6")
    assert code == 0, err
    said = " ".join(out.split())
    assert "finetune: dropped" in said and "diverged at step" in said, out
    assert "no step kept" in said
    code, _, err = cli("refine", run, "--solution", "0", "--merge-bins", "--repair-masks")
    one_line_error(code, err, "--repair-masks", "--finetune-epochs > 0")
    code, _, err = cli("refine", run, "--solution", "0", "--merge-bins", "--masks", "rigl")
    one_line_error(code, err, "--masks", "--finetune-epochs > 0")
    assert "finetune_epochs" not in err
    code, _, err = cli("refine", run, "--solution", "0", "--merge-bins", "--optimizer", "sgd")
    one_line_error(code, err, "--optimizer", "--finetune-epochs > 0")


def test_cli_inspect_refuses_a_truncated_file(run_ctx, tmp_path):
    r = export_solution(run_ctx, 0, out=tmp_path / "s0.mcz")
    bad = tmp_path / "bad.mcz"
    bad.write_bytes(r.mcz.read_bytes()[:100])
    res = CliRunner().invoke(app, ["inspect", str(bad)])
    assert res.exit_code != 0
    assert "truncated" in str(res.exception) or "truncated" in res.output
    ok = CliRunner().invoke(app, ["inspect", str(r.mcz)])
    assert ok.exit_code == 0 and "hidden.0.weight" in ok.output


def test_dense_tensors_are_stored_in_the_problems_dtype(run_ctx, tmp_path):
    from moecomp.codec import encode_model
    from moecomp.solution import dense_tensors

    r = export_solution(run_ctx, 1, out=tmp_path / "s1.mcz")
    decoded = read_mcz(r.mcz)
    sol = run_ctx.solution(1)
    biases = [k for k in sol.state if k not in sol.layers]
    assert biases and all(decoded.state_dict[k].dtype == torch.float16 for k in biases)
    as_fp32 = encode_model(sol.layers, dense_tensors(sol.state, sol.layers),
                           plan=sol.plan.to_dict(), order=list(sol.state))
    n_bias = sum(sol.state[k].numel() for k in biases)
    # float16 saves 2 bytes a bias, less what zstd would have saved on them anyway (about
    # one a bias on the digits teacher, give or take a byte of the header's zstd frame)
    assert len(as_fp32) - r.file_bytes > n_bias // 2


@pytest.mark.parametrize("kind", ["uniform", "kmeans"])
def test_quantisation_in_the_loop_uses_the_plans_quantizer(kind):
    from moecomp.finetune import _fake_quant
    from moecomp.quantize import kmeans_quantize, uniform_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 30, generator=g).requires_grad_(True)
    mask = torch.rand(20, 30, generator=g) > 0.6
    q = _fake_quant(w, mask, 2, kind)
    idx, cb = (kmeans_quantize if kind == "kmeans" else uniform_quantize)(w[mask].detach(), 2)
    torch.testing.assert_close(q[mask].detach(), cb[idx], rtol=0, atol=1e-6)  # v + (c - v)
    assert torch.count_nonzero(q[~mask]) == 0
    q.sum().backward()  # straight through: every survivor gets gradient 1, pruned ones 0
    assert torch.equal(w.grad, mask.float())
