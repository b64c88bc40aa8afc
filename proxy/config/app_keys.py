"""What an app verifies with: HS* `secrets`, or `public_keys`, `jwks_file` and `jwks_url`.

secrets = read_secrets(section, {"HS256"})                  # decoded, long enough
keys = read_keys(section, {"RS256"}, jwks_url, None, reader)  # every problem recorded
"""

from __future__ import annotations

import json

from .. import jwk
from ..jwk import jwks_url_problem
from ..yamlconf import Section
from .reader import Reader, b64decode


def read_secrets(section: Section, hs: set[str]) -> tuple[bytes, ...]:
    encoding = section.choice("secret_encoding", ("base64", "raw"), "base64")
    values = section.strings("secrets")
    if values is not None and not values:
        section.problem("secrets", "an HS* app needs at least one secret")
    need = max(jwk.HS_MIN_BYTES[alg] for alg in hs)
    decoded: list[bytes] = []
    for index, value in enumerate(values or ()):
        key = f"secrets[{index}]"
        if encoding == "raw":
            try:
                secret = value.encode("utf-8")
            except UnicodeEncodeError:  # a non-UTF-8 byte from the environment
                section.problem(key, "is not valid UTF-8 text")
                continue
        else:
            try:
                secret = b64decode(value)
            except ValueError:
                section.problem(key, "is not valid base64 (standard or url-safe alphabet)")
                continue
        if len(secret) < need:
            section.problem(
                key,
                f"is {len(secret)} bytes; {'/'.join(sorted(hs))} needs at least {need} "
                f"(make one with: token-proxy keygen --alg {max(hs)})",
            )
            continue
        decoded.append(secret)
    return tuple(decoded)


def read_keys(
    section: Section,
    algs: set[str],
    jwks_url: str | None,
    discovery_url: str | None,
    reader: Reader,
) -> tuple[jwk.VerifyKey, ...]:
    # (key path, what within it, key): a problem names the one key it is about
    found: list[tuple[str, str, jwk.VerifyKey]] = []
    files = section.strings("public_keys", ()) or ()
    for index, file in enumerate(files):
        where = f"public_keys[{index}]"
        data = reader.read_file(section, where, file)
        if data is None:
            continue
        try:
            found.append((where, reader.that(file), jwk.load_pem_public(data, where)))
        except jwk.KeyMaterialError as error:
            section.problem(where, f"{reader.that(file)} {error}")
    jwks_file = section.optional_string("jwks_file")
    if jwks_file is not None:
        found.extend(("jwks_file", at, key) for at, key in _jwks_file(section, jwks_file, reader))
    if jwks_url is not None:
        problem = jwks_url_problem(jwks_url)
        if problem:
            section.problem("jwks_url", reader.url_problem(jwks_url, problem))
    given = files or section.has("jwks_file") or jwks_url or discovery_url
    if not given:  # a source given but unusable has its own problem already
        section.problem(
            "", "an asymmetric app needs public_keys, jwks_file or jwks_url (or discovery_url)"
        )
    for where, at, key in found:
        if not any(key.fits(alg) for alg in algs):
            section.problem(
                where,
                f"{at} holds {jwk.describe(key.key)}, which fits none of the app's algorithms "
                f"({', '.join(sorted(algs))})",
            )
    return tuple(key for _, _, key in found)


def _jwks_file(section: Section, file: str, reader: Reader) -> list[tuple[str, jwk.VerifyKey]]:
    """The keys of a JWKS file, each with where it is (`keys[1]`); one problem per bad key."""
    data = reader.read_file(section, "jwks_file", file)
    if data is None:
        return []
    try:
        keys, skipped = jwk.parse_jwks(json.loads(data), "jwks_file")
    except (ValueError, jwk.KeyMaterialError):  # not JSON, or not a JWKS document
        what = reader.that(file)
        section.problem("jwks_file", f"{what} is not a JWKS document (an object with a keys list)")
        return []
    if not keys and not skipped:
        section.problem("jwks_file", f"{reader.that(file)} holds no key")
    for line in skipped:
        section.problem("jwks_file", line)
    return [(f"keys[{index}]", key) for index, key in keys]
