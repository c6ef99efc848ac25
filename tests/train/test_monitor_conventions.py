"""What a run shows a user who lives in TensorBoard and SLURM logs (issue 24 items 1, 2): an HParams session
with the resolved config and the validation metrics, the config as text, and log lines with the total,
percentage and ETA."""
import re

import helpers.train as th
from hvae_dist.cli import main
from hvae_dist.train.monitor import flat_hparams, format_hms

one_thread = th.one_thread


def _hparams_session(run_dir):
    """(hparams of the session start, metric tags of the experiment) from the run's event files."""
    from tensorboard.plugins.hparams import metadata

    acc = th.tb_accumulator(run_dir)
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    hparams = {k: v.number_value if v.HasField("number_value") else v.string_value if v.HasField("string_value")
               else v.bool_value for k, v in start.hparams.items()}
    return hparams, [m.name.tag for m in experiment.metric_infos], acc


def test_a_run_has_an_hparams_session_with_its_config_and_validation_metrics_and_the_config_as_text(tmp_path):
    run = tmp_path / "run"
    assert main(th.train_args(run, 2, train__eval_every=2, train__eval_examples=8, train__eval_iw_samples=2,
                              train__lr=0.002)) == 0
    hparams, metrics, acc = _hparams_session(run)
    assert hparams["train.lr"] == 0.002 and hparams["train.grad_clip"] == 200.0      # a default the preset leaves
    assert hparams["model.likelihood"] == "bernoulli" and hparams["data.root"] == "none"
    assert "val/FashionMNIST_validation/bpd" in metrics
    assert "val/FashionMNIST_validation/bpd" in acc.Tags()["scalars"]                # the view reads its values
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_training_log_lines_give_step_of_total_percent_and_eta(tmp_path):
    run = tmp_path / "run"
    assert main(th.train_args(run, 4, train__log_every=2)) == 0
    lines = [x for x in (run / "train.log").read_text().splitlines() if " loss " in x]
    assert re.search(r" step 2 loss .* img/s \d+ \(2/4, 50%, ETA \d\d:\d\d:\d\d\)$", lines[0]), lines
    assert lines[-1].endswith("(4/4, 100%, ETA 00:00:00)"), lines


def test_flat_hparams_are_numbers_strings_or_booleans():
    flat = flat_hparams(th.small_config())
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert flat["model.config_deterministic"].startswith("[[{")
    assert format_hms(3725.4) == "01:02:05"


def test_on_a_terminal_log_lines_go_around_the_progress_bar_and_the_handlers_come_back(tmp_path):
    import logging

    import torch

    from hvae_dist.train.monitor import Monitor, setup_logging

    setup_logging(tmp_path, True)
    root = logging.getLogger("hvae_dist")
    before = list(root.handlers)
    monitor = Monitor(tmp_path, True, 1, torch.device("cpu"), progress=True)
    monitor.start(0, 10)
    assert any(type(h).__name__ == "_TqdmLoggingHandler" for h in root.handlers)   # tqdm.write above the bar
    monitor.close()
    assert root.handlers == before
