import pytest

from featkd.cli import build_parser, main
from featkd.cli.common import CliError, build_model_from_args, parse_layers


def test_parse_layers():
    assert parse_layers("all") == "all"
    assert parse_layers(" auto ") == "auto"
    assert parse_layers("1, 2,-1,layer3.1") == [1, 2, -1, "layer3.1"]
    with pytest.raises(CliError, match="empty layer list"):
        parse_layers(" , ")


def test_build_model_errors(tmp_path):
    with pytest.raises(CliError, match="resnet9"):
        build_model_from_args("no_such_model", 0.25, 10, 3, 32)
    with pytest.raises(FileNotFoundError):
        build_model_from_args("resnet9", 0.0625, 10, 3, 32, checkpoint=str(tmp_path / "none.pt"))


def test_parser_lists_every_command():
    help_text = build_parser().format_help()
    for command in ("quality", "train-teacher", "distill", "demo"):
        assert command in help_text


def test_missing_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
