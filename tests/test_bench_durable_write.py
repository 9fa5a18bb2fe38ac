"""bench/durable_write.py: each way of writing a file durably runs, with one writer and with four, and the
files are gone afterwards."""

from bench.durable_write import filesystem, main


def test_every_kind_of_write_is_timed_and_cleaned_up(tmp_path, capsys):
    assert main(["--size", "4096", "--count", "8", "--repeat", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.rsplit(maxsplit=2)[0]: line.split()[-2:] for line in out.splitlines()[2:7]}
    assert set(rows) == {"node", "node, no folder fsync", "new file O_DSYNC", "overwrite O_DSYNC",
                         "overwrite, then publish"}
    assert all(float(v) > 0 for pair in rows.values() for v in pair)
    assert list(tmp_path.iterdir()) == []  # its folder removed
    assert filesystem(tmp_path) in out
