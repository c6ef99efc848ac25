"""`hvae --version`, `hvae config show`, and the `--local_rank` that DeepSpeed's launcher puts first (issue 24)."""
import json

import pytest

from hvae_dist import __version__
from hvae_dist.cli import main, take_local_rank
from hvae_dist.errors import ConfigError


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"hvae-dist {__version__}"


def test_config_show_prints_every_default_not_only_what_the_preset_sets(capsys):
    preset = json.loads(open(__import__("hvae_dist").__path__[0] + "/presets/tiny.json").read())
    assert "grad_clip" not in preset.get("train", {})      # so the key below comes from the dataclass default
    assert main(["config", "show", "tiny", "--set", "train.lr=0.01"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["lr"] == 0.01
    assert "grad_clip" in shown["train"]
    assert set(shown) == {"model", "data", "train"}


def test_config_show_refuses_an_unknown_key_like_train_does(capsys):
    assert main(["config", "show", "tiny", "--set", "train.nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--local_rank=3", "train", "x"], ["--local_rank", "3", "train", "x"],
                                  ["--local-rank=3", "train", "x"]])
def test_local_rank_first_is_taken_and_exported(argv):
    env = {}
    assert take_local_rank(argv, env) == ["train", "x"]
    assert env["LOCAL_RANK"] == "3"


def test_local_rank_must_agree_with_LOCAL_RANK():
    assert take_local_rank(["--local_rank=1", "train"], {"LOCAL_RANK": "1"}) == ["train"]
    with pytest.raises(ConfigError, match="LOCAL_RANK=0"):
        take_local_rank(["--local_rank=1", "train"], {"LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="non-negative integer"):
        take_local_rank(["--local_rank=x", "train"], {})


def test_argv_without_local_rank_is_unchanged():
    env = {}
    assert take_local_rank(["train", "--local_rank=1"], env) == ["train", "--local_rank=1"]
    assert env == {}
