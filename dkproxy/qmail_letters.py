"""qmail-dk / qmail-dkim verification letters and status fields, from a VerificationReport.

qmail-dk (DomainKeys) and qmail-dkim (DKIM) let the administrator choose which verification
results refuse a message: `DKVERIFY` / `DKIMVERIFY` hold a set of letters, each naming a
library status; an upper-case letter refuses permanently, a lower-case one temporarily.
This module names each of our results with the letter those programs would have used, so a
tcprules file written for them keeps its meaning:

* DomainKeys (qmail-dk, libdomainkeys DK_STAT_*): A good, B bad signature, C no signature,
  D no key, E bad key, F cannot verify (DNS), G syntax, H no resources, I bad arguments,
  J revoked, K internal error (L granularity, from later libdomainkeys).
* DKIM (qmail-dkim, libdkim DKIM_*, in its man page's order): A success, G fail, H bad
  syntax, I signature bad, J bad but testing, K expired, L selector invalid, M granularity
  mismatch, N key revoked, P DNS temporary failure, Q DNS permanent failure, R public key
  invalid, S no signatures, T no valid signatures, U body hash mismatch, V algorithm
  mismatch, W incompatible version.

The legacy `DomainKey-Status:` and `DKIM-Status:` fields carry the same verdicts in words.
"""

from __future__ import annotations

from dkproxy.mailauth.verifier import SignatureResult, VerificationReport

#: qmail-dk / qmail-dkim exit codes for a refusing letter (upper case, lower case).
PERMANENT = 13
TEMPORARY = 82

#: DKIM-Status text per letter (qmail-dkim's words where filters match on them).
DKIM_STATUS = {
    "A": "good",
    "G": "bad",
    "H": "bad format",
    "I": "bad",
    "J": "bad (testing)",
    "K": "expired",
    "L": "bad key",
    "M": "bad key",
    "N": "revoked",
    "P": "temporary failure",
    "Q": "no key",
    "R": "bad key",
    "S": "no signatures",
    "T": "no valid signatures",
    "U": "bad",
    "V": "bad key",
    "W": "bad format",
}

#: (substring of our reason text, letter), checked in order, for failing DKIM signatures.
_DKIM_REASONS = (
    ("no key for signature", "Q"),
    ("key revoked", "N"),
    ("unsupported version", "W"),
    ("key type does not match", "V"),
    ("does not allow hash", "V"),
    ("subdomain identities", "M"),
    ("not for email", "L"),
    ("key record", "R"),
    ("unusable key", "R"),
    ("unsupported key type", "R"),
    ("body hash mismatch", "U"),
    ("expired", "K"),
    ("did not verify", "I"),
)


def dkim_letter(sig: SignatureResult) -> str:
    """The qmail-dkim letter for one DKIM signature's verdict."""
    if sig.result == "pass":
        return "A"
    if sig.result == "temperror":
        return "P"
    for text, letter in _DKIM_REASONS:
        if text in sig.reason:
            if letter == "I" and sig.testing:
                return "J"
            return letter
    if sig.result in ("policy", "neutral", "fail"):
        return "G"
    return "H"  # permerror from parsing the signature itself


def dkim_letters(report: VerificationReport) -> list[str]:
    """The message's DKIM letters: A when a signature passed, S when there is none, else T
    plus each checked signature's letter (in header order)."""
    checked = [sig for sig in report.dkim if sig.checked]
    if any(sig.result == "pass" for sig in checked):
        return ["A"]
    if not checked:
        return ["S"]
    letters = ["T"]
    for sig in checked:
        letter = dkim_letter(sig)
        if letter not in letters:
            letters.append(letter)
    return letters


def dk_letter(sig: SignatureResult) -> str:
    """The qmail-dk letter for one DomainKey-Signature's verdict."""
    if sig.result == "policy":
        return "E"  # a key below min_key_bits: libdomainkeys had no such status
    if sig.result == "temperror":
        return "F"
    status = sig.dk_status
    if status == "good":
        return "A"
    if status == "bad":
        return "L" if "granularity" in sig.reason else "B"
    if status == "no key":
        return "D"
    if status == "revoked":
        return "J"
    if status == "bad format":
        # domainkeys.py words key problems "public key: ..."; the rest is signature syntax.
        return "E" if sig.reason.startswith("public key") else "G"
    return "K"  # no status: our own error while verifying


def dk_letters(report: VerificationReport) -> list[str]:
    """The message's DomainKeys letter, as qmail-dk reports one: A when a DomainKeys
    signature passed, C when there is none, else the first checked signature's."""
    checked = [sig for sig in report.domainkeys if sig.checked]
    if any(sig.result == "pass" for sig in checked):
        return ["A"]
    if not checked:
        return ["C"]
    return [dk_letter(checked[0])]


def letters_verdict(letters: list[str], configured: str) -> int:
    """0, or the exit code for the first refusing letter: 13 for an upper-case match
    (permanent), 82 for a lower-case one (temporary); permanent wins."""
    if any(letter in configured for letter in letters):
        return PERMANENT
    if any(letter.lower() in configured for letter in letters):
        return TEMPORARY
    return 0


def status_fields(report: VerificationReport) -> list[str]:
    """`DKIM-Status:` and `DomainKey-Status:` values for filters written for qmail-dk(im)."""
    dkim = dkim_letters(report)
    dkim_word = DKIM_STATUS.get(dkim[-1], "bad")
    checked = [sig for sig in report.domainkeys if sig.checked]
    if any(sig.result == "pass" for sig in checked):
        dk_word = "good"
    elif not checked:
        dk_word = "no signature"
    else:
        dk_word = checked[0].dk_status or "bad format"
        if checked[0].result == "policy":
            dk_word = "bad"
    return [f"DKIM-Status: {dkim_word}", f"DomainKey-Status: {dk_word}"]
