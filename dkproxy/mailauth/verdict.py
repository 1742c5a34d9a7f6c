"""The SMTP verdict for a verification report: DKIMproxy's reject_fail / reject_error and
the per-result actions of the native configuration (pure: no I/O, no clock).
"""

from __future__ import annotations

from dataclasses import replace

from .verify_report import Action, Decision, VerificationReport, VerifySettings

#: Enhanced status codes (RFC 3463, RFC 7372) for a rejection caused by each method.
_REJECT_CODES = {"dkim": "5.7.20", "spf": "5.7.23", "domainkeys": "5.7.1", "dmarc": "5.7.1"}
_SEVERITY: dict[Action, int] = {"accept": 0, "tempfail": 1, "reject": 2}
_ACCEPT = Decision("accept")


def matched_actions(
    report: VerificationReport, settings: VerifySettings
) -> list[tuple[str, Action]]:
    """The ("method.result", action) pairs of `settings.actions` that apply to the report.

    "dmarc.reject" / "dmarc.quarantine" apply when DMARC fails and the sender's policy (p=,
    or sp= for a subdomain) is reject / quarantine; "dmarc.fail" applies to any DMARC fail.
    """
    keys = [f"{method}.{result}" for method, result in report.method_results().items()]
    if report.dmarc_override:  # a trusted ARC sealer vouched for the author domain
        keys = [key for key in keys if key != "dmarc.fail"]
    dmarc = report.dmarc
    if (
        dmarc is not None
        and dmarc.result == "fail"
        and dmarc.policy in ("quarantine", "reject")
        and not report.dmarc_override
    ):
        keys.append(f"dmarc.{dmarc.policy}")
    return [(key, settings.actions[key]) for key in keys if key in settings.actions]


def decide(report: VerificationReport, settings: VerifySettings) -> Decision:
    """The SMTP verdict for a verified message (pure: no I/O, no clock).

    In order:
    - reject_fail: 550 when the sender's published policy says reject: DMARC fails and p=
      (sp= for a subdomain) is reject, unless a trusted ARC sealer overrides it; or
      DomainKeys o=- without a passing first-party signature (not when the policy or key is
      in testing mode).
    - reject_error: 451 on a temporary error that could change the outcome: no DKIM or
      DomainKeys signature passed and one hit a temperror, or DMARC itself is temperror.
    - `settings.actions` ("method.result" -> action, see `matched_actions`); the most severe
      matching action wins.
    With several author domains (dkproxy.mailauth.authors) the verdict is the most severe of those
    each author domain's DMARC result alone gives. Under reject_fail, a From field without
    any author domain DMARC can evaluate, or with a mailbox whose domain cannot be used
    beside usable ones, is rejected (the safe result: RFC 7489 6.6.1 leaves such messages
    out of scope).
    """
    if not (settings.reject_fail or settings.reject_error or settings.actions):
        return _ACCEPT  # nothing can refuse the message: no need to look at the report
    if len(report.dmarc_authors) > 1:
        each = [
            decide(replace(report, dmarc=result, dmarc_authors=[result]), settings)
            for result in report.dmarc_authors
        ]
        return max(each, key=lambda d: _SEVERITY[d.action])  # first of the most severe
    if settings.reject_fail and report.author_problem:
        return Decision(
            "reject",
            f"550 5.7.1 Message rejected: DMARC cannot be applied ({report.author_problem})",
            "dmarc-author",
        )
    dmarc = report.dmarc
    if settings.reject_fail:
        if (
            dmarc is not None
            and dmarc.result == "fail"
            and dmarc.policy == "reject"
            and not report.dmarc_override
        ):
            return Decision(
                "reject",
                f"550 5.7.1 Message rejected: DMARC policy of {dmarc.from_domain} "
                f"says reject ({dmarc.reason})",
                "dmarc",
            )
        policy = report.dk_policy
        if policy is not None and policy.verdict == "reject":
            return Decision(
                "reject",
                f"550 5.7.1 Message rejected: DomainKeys policy of {policy.domain} requires "
                "a valid signature",
                "domainkeys-policy",
            )
    if settings.reject_error and (
        report.signature_result == "temperror"
        or (dmarc is not None and dmarc.result == "temperror")
    ):
        return Decision(
            "tempfail",
            "451 4.4.3 Temporary DNS failure verifying the message; please try again later",
            "temperror",
        )
    matched = matched_actions(report, settings)
    if not matched:
        return Decision("accept")
    key, action = max(matched, key=lambda item: _SEVERITY[item[1]])
    method, _, result = key.partition(".")
    if action == "reject":
        code = _REJECT_CODES.get(method, "5.7.1")
        return Decision("reject", f"550 {code} Message rejected: {method}={result}", key)
    if action == "tempfail":
        return Decision(
            "tempfail", f"451 4.7.1 Message deferred: {method}={result}; try again later", key
        )
    return Decision("accept", "", key)
