"""What a person sees on the console: a large sweep shows a line per stack and epoch and each job's
lines in its own log file; a small one keeps each job's lines, with the stack's timing said so."""

import re

from conftest import run_cli


def test_a_large_sweep_prints_a_line_per_stack_and_epoch_and_keeps_job_lines_in_their_files(tmp_path, mnist5k_root):
    # 12 jobs, in stacks of at most 8: 8 + 4; lr 1e38 (jobs #2, #5, #8 and #11) diverges in both.
    proc = run_cli(["-m", "model.sigma=0.01,0.1,0.5,1.0", "optim.lr=0.05,0.5,1e38", "trainer.epochs=2",
                    "data.batch_size=96", "hydra.launcher.max_stack=8", f"data.root={mnist5k_root}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    # No job's own INFO lines on the console, and no "#N :" list: one line says where they are.
    assert not re.search(r"epoch +\d+/2 +loss", out) and "MLflow run" not in out and "\t#3 :" not in out
    assert re.search(r"jobs #0\.\.#11: each job's overrides and lines are in its folder, .*/<N>/ "
                     r"\(\.hydra/overrides\.yaml, run\.log\); here, a line per stack and epoch", out)
    progress = [line for line in lines if re.search(r"stack \S+ \(\d of 2\): epoch", line)]
    assert len(progress) == 4, out[-4000:]
    first = re.search(r"stack (\S+)/1 \(1 of 2\): epoch 1/2, (\d+) of 8 jobs going; best test_acc (0\.\d{4}) "
                      r"\(#(\d+) (model\.sigma=\S+ optim\.lr=\S+)\); [\d.]+ s so far, about [\d.]+ s left", progress[0])
    assert first, progress[0]
    going, best_acc, best_num = int(first[2]), float(first[3]), int(first[4])
    assert going == 8 - 2  # the two 1e38 jobs of the first stack stopped at epoch 1
    assert "1e38" not in first[5]
    done = [line for line in lines if " done in " in line]
    assert len(done) == 2 and re.search(r"stack \S+/2 done in [\d.]+ s: 2 of 4 runs FINISHED \(not: #8 FAILED, #11 "
                                        r"FAILED\)", done[1]), done
    # Errors still reach the console: one line per diverged run.
    assert len(re.findall(r"\[ERROR\] - run \w+ stopped: epoch 1: mean training loss", out)) == 4
    assert re.search(r"sweep \S+ ended FINISHED after [\d.]+ s; its runs in the MLflow UI", out)
    # One seed per config: the commands that tell whether the top 3's order is more than noise.
    hint = out.split("one seed per config")[1].splitlines()[1:4]
    assert all(re.fullmatch(r"python run\.py -m trainer\.epochs=2 data\.batch_size=96 "
                            r"data\.root=\S+ model\.sigma=\S+ optim\.lr=\S+ seed=1,2,3,4,5", h) for h in hint), hint
    # The table's columns follow the command's order of axes (sigma, then lr).
    assert re.search(r"\n +run_id +model\.sigma +optim\.lr +test_acc ", out)
    # Each job's own lines are in its log file, the stack's timing said as such.
    sweep_dir = next((tmp_path / "outputs" / "sweeps").glob("*/*"))
    job_log = (sweep_dir / str(best_num) / "run.log").read_text()
    assert re.search(r"epoch 1/2  loss \S+  train_acc \S+  test_acc %.4f  the stack of 8: [\d.]+s train" % best_acc,
                     job_log), job_log
    assert "MLflow run" in job_log and len(list(sweep_dir.glob("[0-9]*/run.log"))) == 12
    for log_file in sweep_dir.glob("[0-9]*/run.log"):  # a job's file holds its own lines only, not the launcher's
        assert not re.search(r"\[HYDRA\]|stack \S+ \(|Launching", log_file.read_text()), log_file


def test_a_small_sweep_keeps_each_jobs_lines_and_says_the_timing_is_the_stacks(card):
    out = (card["stacked"] / "stdout.txt").read_text()
    assert re.search(r"\t#0 : optim\.lr=0\.05", out)
    assert re.search(r"\[mnist_logreg\.job\.\d\]\[INFO\] - epoch 3/3  loss \S+  train_acc \S+  test_acc \S+  "
                     r"the stack of 4: [\d.]+s train \+ [\d.]+s eval", out), out[-2000:]
    assert "of 2): epoch" not in out
    assert re.search(r"sweep \S+ ended FINISHED after [\d.]+ s", out)
