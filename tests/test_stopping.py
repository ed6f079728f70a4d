from pdserve.stopping import StopChecker


def run(pieces, stop):
    checker = StopChecker(stop)
    out = []
    for piece in pieces:
        out.append(checker.feed(piece))
        if checker.stopped:
            return "".join(out), True
    return "".join(out) + checker.flush(), False


def test_no_stop_passes_everything():
    assert run(list("hello"), []) == ("hello", False)


def test_stop_string_across_pieces_is_cut():
    assert run(list("hello world"), ["lo w"]) == ("hel", True)


def test_held_back_text_is_released_when_no_stop_follows():
    checker = StopChecker(["abc"])
    assert checker.feed("xa") == "x"
    assert checker.feed("b") == ""
    assert checker.feed("d") == "abd"


def test_earliest_of_several_stops_wins():
    assert run(["one two three"], ["three", "two"]) == ("one ", True)
