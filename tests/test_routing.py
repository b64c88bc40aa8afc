"""Path normalisation and route patterns (SPEC §4 steps 1-2)."""

from __future__ import annotations

import pytest

from proxy.errors import Reason, Rejection
from proxy.routing import PathPattern, split_target


@pytest.mark.parametrize(
    ("target", "forwarded", "matched", "query"),
    [
        ("/", "/", "/", ""),
        ("/a/b", "/a/b", "/a/b", ""),
        ("/a/b/?x=%2F&y", "/a/b/", "/a/b/", "x=%2F&y"),
        ("/a//b///c", "/a/b/c", "/a/b/c", ""),
        ("/a/./b/.", "/a/b/", "/a/b/", ""),
        ("/a/b/../c", "/a/c", "/a/c", ""),
        ("/a/b/..", "/a/", "/a/", ""),
        ("/a/%2e%2E/c", "/c", "/c", ""),
        ("/%7Euser/%41%2d%5f", "/~user/A-_", "/~user/A-_", ""),
        ("/a%2a%3b%c3%a9", "/a%2A%3B%C3%A9", "/a%2A%3B%C3%A9", ""),
        ("/admin;x/users", "/admin;x/users", "/admin/users", ""),
        ("/admin/;x/users", "/admin/;x/users", "/admin/users", ""),
        ("/a;b=1;c/d;e", "/a;b=1;c/d;e", "/a/d", ""),
        ("/x#fragment", "/x", "/x", ""),
        ("http://api.example/v1?q", "/v1", "/v1", "q"),
        ("http://API.example:80/v1", "/v1", "/v1", ""),
        ("https://api.example:443", "/", "/", ""),
    ],
)
def test_normalisation(target: str, forwarded: str, matched: str, query: str) -> None:
    result = split_target(target, "api.example")
    assert (result.path, result.match, result.query) == (forwarded, matched, query)


@pytest.mark.parametrize(
    "target",
    [
        "a/b",
        "*",
        "/a\\b",
        "/a\x01b",
        "/a\x7fb",
        "/a%",
        "/a%4",
        "/a%g0",
        "/a%00",
        "/a%2f",
        "/a%2F",
        "/a%5c",
        "/a%5C",
        "/..",
        "/a/../..",
        "/%2e%2e",
        "/..;/a",
        "/a/.;x/b",
        "/a/%2e%2e;x/",
        "http://other.example/v1",
        "http://api.example:8080/v1",
        "ftp://api.example/v1",
    ],
)
def test_bad_paths(target: str) -> None:
    with pytest.raises(Rejection) as raised:
        split_target(target, "api.example")
    assert raised.value.reason is Reason.BAD_PATH


def test_absolute_form_needs_a_host_header() -> None:
    with pytest.raises(Rejection):
        split_target("http://api.example/v1", None)


@pytest.mark.parametrize(
    ("pattern", "path", "params"),
    [
        ("/v1/*", "/v1", {}),
        ("/v1/*", "/v1/", {}),
        ("/v1/*", "/v1/a/b", {}),
        ("/v1/*", "/v10", None),
        ("/*", "/", {}),
        ("/*", "/anything/at/all", {}),
        ("/admin/*", "/admin", {}),
        ("/admin", "/admin/", None),
        ("/admin/", "/admin/", {}),
        ("/admin/", "/admin", None),
        ("/users/{id}", "/users/42", {"id": "42"}),
        ("/users/{id}", "/users/", None),
        ("/users/{id}", "/users/42/x", None),
        ("/users/{id}/t/*", "/users/42/t", {"id": "42"}),
        ("/u/{a}/{b}", "/u/x%20y/z", {"a": "x%20y", "b": "z"}),
        ("/Admin", "/admin", None),
    ],
)
def test_patterns(pattern: str, path: str, params: dict[str, str] | None) -> None:
    assert PathPattern.compile(pattern).match(path) == params


def test_literal_patterns_answer_like_their_regex() -> None:
    # Patterns without {name} skip the regex on the request path; the answers must not change.
    patterns = ["/", "/*", "/v1/*", "/v1", "/v1/", "/admin/*", "/a/b/*", "/%7euser/*", "/a.b/*"]
    paths = ["/", "/v1", "/v1/", "/v10", "/v1/a/b", "/V1", "/admin", "/admin/", "/adminx"]
    paths += ["/a/b", "/a/b/", "/a/bc", "/~user", "/~user/x", "/a.b", "/aXb/c", "/a\nb", ""]
    for text in patterns:
        pattern = PathPattern.compile(text)
        assert pattern.literal is not None, text  # the fast path is the one under test
        for path in paths:
            found = pattern.regex.fullmatch(path)
            assert pattern.match(path) == (found.groupdict() if found else None), (text, path)


def test_case_insensitive_patterns_keep_parameter_case() -> None:
    pattern = PathPattern.compile("/Users/{id}", ignore_case=True)
    assert pattern.match("/USERS/AbC") == {"id": "AbC"}


@pytest.mark.parametrize(
    "pattern",
    ["v1", "/a/*/b", "/a*", "/{x}/{x}", "/a/{x", "/a//b", "/a/../b", "/a?b", "/a;b", "/a%2Fb"],
)
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match=r".+"):
        PathPattern.compile(pattern)


def test_shape_ignores_parameter_names_and_equivalent_escapes() -> None:
    # Routes of one shape are the ones a request's method chooses between (SPEC §4 step 2).
    def shape(text: str, ignore_case: bool = False) -> str:
        return PathPattern.compile(text, ignore_case).shape

    assert shape("/docs/{page}/*") == shape("/docs/{name}/*") == "/docs/{}/*"
    assert shape("/%7euser/{id}") == shape("/~user/{x}")
    assert shape("/docs/*") != shape("/docs/{page}")
    assert shape("/admin/") != shape("/admin")
    assert shape("/Admin/*") != shape("/admin/*")
    assert shape("/Admin/*", ignore_case=True) == shape("/admin/*", ignore_case=True)
