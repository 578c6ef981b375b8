from __future__ import annotations

from serving.stops import StopChecker


def test_text_that_may_become_a_stop_is_held_back():
    s = StopChecker(["\n\n", "END"])
    assert s.feed("a = 1") == ("a = 1", False)
    assert s.feed("a = 1\n") == ("", False)  # could be the start of "\n\n"
    assert s.feed("a = 1\nb") == ("\nb", False)
    assert s.feed("a = 1\nbEN") == ("", False)
    assert s.feed("a = 1\nbEND tail") == ("", True)
    assert s.text == "a = 1\nb"


def test_partial_utf8_waits_and_flush_returns_the_rest():
    s = StopChecker([])
    assert s.feed("x\ufffd") == ("x", False)
    assert s.feed("xé") == ("é", False)
    t = StopChecker(["STOP"])
    t.feed("abST")
    assert t.flush() == "ST"
