"""What a workload says while it loads (which tokenizer it found, and how well it fits). Every
rank of a run loads the same model and data; only rank 0 speaks, since the others would repeat
it word for word: the run room silences them (`quiet()`)."""

_quiet = False


def quiet() -> None:
    global _quiet
    _quiet = True


def note(msg: str) -> None:
    if not _quiet:
        print(f"lldist: {msg}", flush=True)
