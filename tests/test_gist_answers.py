"""Gist's answers read right: a review's counterexamples (stop 36), each a way the state
database ended up disagreeing with Gist for good, against the real sync and the fake Gist.
Answers the fake cannot give (a 409 after a lost answer, a TLS error reading an answer,
batch answers of other shapes) come from a hook on a real transport to it: the fake applies
the request, the hook decides what the client reads."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import Engine, select

from audience_sync.fakegist import FakeGist
from audience_sync.models import member_changes, memberships, uncertain_members
from tests.conftest import Workspace, write_members
from tests.test_exactness import VIP, add_audience, held, sync, table

Hook = Callable[[httpx.AsyncHTTPTransport, httpx.Request], Awaitable[httpx.Response]]


async def apply(inner: httpx.AsyncHTTPTransport, request: httpx.Request) -> None:
    """Let the fake Gist apply ``request``; its answer is read and thrown away."""
    response = await inner.handle_async_request(request)
    await response.aread()
    await response.aclose()


class Hooked(httpx.AsyncBaseTransport):
    """A real transport to the fake Gist, with a hook that may rewrite any exchange."""

    def __init__(self, hook: Hook) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.hook = hook

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.hook(self.inner, request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def forward_body(request: httpx.Request, body: Any) -> httpx.Request:
    """``request`` with another JSON body (same URL and headers)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    return httpx.Request(request.method, request.url, headers=headers, json=body,
                         extensions=request.extensions)  # fmt: skip


def batch_applied_but(user: str, answer: Callable[[list[Any]], Any]) -> Hooked:
    """A Gist that applies each batch but ``user``'s contact and answers 200 with the JSON
    ``answer(contacts)`` makes of the contacts sent."""

    async def hook(inner: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/contacts/batch":
            contacts = json.loads(request.content)["contacts"]
            rest = [c for c in contacts if c["user_id"] != user]
            await apply(inner, forward_body(request, {"contacts": rest}))
            return httpx.Response(200, json=answer(contacts))
        return await inner.handle_async_request(request)

    return Hooked(hook)


def acked(engine: Engine) -> set[str]:
    return {u for (u,) in table(engine, select(memberships.c.user_id))}


def true_in_gist(gist: FakeGist) -> set[str]:
    return {u for u, v in held(gist, VIP).items() if v is True}


# 1 ---------------------------------------------------------------------------------------
# A try whose answer was lost (Gist applied it), then a 4xx on the retry (the fake's
# ``lose_then_refuse``): the 4xx says only that the *retry* was not applied, yet the change
# was recorded as "refused" and the uncertainty about the member taken back.


def test_4xx_on_a_retry_after_a_lost_answer_keeps_the_member_uncertain(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace)
    write_members(source, [1, 2])
    sync(workspace, engine)
    assert true_in_gist(gist) == {"u1", "u2"}

    write_members(source, [2])  # u1 leaves: `false`
    gist.clear_log()
    gist.lose_then_refuse("u1", 409)  # applied, the answer lost; the retry refused
    [run] = sync(workspace, engine)
    gist.reset_faults()
    assert [r.body["user_id"] for r in gist.requests("/contacts")] == ["u1", "u1"]
    assert held(gist, VIP)["u1"] is False  # the first try was applied

    # Gist holds `false`, the ledger still `true`: only uncertainty can tell the next run.
    unsure = {u for (u,) in table(engine, select(uncertain_members.c.user_id))}
    assert "u1" in unsure, (run.status, unsure)


def test_4xx_on_a_retry_after_a_lost_answer_leaves_gist_wrong_for_good(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    source = add_audience(workspace)
    write_members(source, [1, 2])
    sync(workspace, engine)

    write_members(source, [2])
    gist.lose_then_refuse("u1", 409)
    sync(workspace, engine)
    gist.reset_faults()

    write_members(source, [1, 2])  # u1 is back before the exit was ever acknowledged
    sync(workspace, engine)
    sync(workspace, engine)

    assert acked(engine) == {"u1", "u2"}
    assert held(gist, VIP)["u1"] is True  # Gist should hold the source's `true` again


def test_batch_lost_then_single_4xx_keeps_the_member_uncertain(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    """The batch path: the batch is applied but its answers are lost (every try), so its
    contacts go one by one; one of those singles is refused. The batch may have applied it."""
    workspace.gist_options.update(batch_size=10, max_retries=1)
    workspace.write_config()
    source = add_audience(workspace)
    write_members(source, [1, 2, 3])
    sync(workspace, engine)

    async def hook(inner: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/contacts/batch":
            await apply(inner, request)  # applied
            raise httpx.ReadTimeout("no answer")
        if json.loads(request.content)["user_id"] == "u1":
            return httpx.Response(422, json={"errors": [{"message": "Contact is locked"}]})
        return await inner.handle_async_request(request)

    write_members(source, [2])  # u1 and u3 leave
    sync(workspace, engine, transport=Hooked(hook))
    assert held(gist, VIP)["u1"] is False  # the batch applied it

    write_members(source, [1, 2])  # u1 back
    sync(workspace, engine)
    assert held(gist, VIP)["u1"] is True, table(
        engine, select(member_changes.c.user_id, member_changes.c.value, member_changes.c.status)
    )


# 2 ---------------------------------------------------------------------------------------
# A batch's 2xx whose error names a contact by an email two contacts of the batch share:
# the error is pinned on the last of them, and the one Gist refused is acknowledged.


def test_batch_error_naming_a_shared_email_acknowledges_the_refused_contact(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    workspace.gist_options["batch_size"] = 10
    workspace.write_config()
    source = add_audience(workspace)
    shared = "family@example.com"
    write_members(source, [("u1", shared), ("u2", shared), ("u3", "u3@example.com")])

    # Gist applies all but u1, and names the failed contact by its email.
    answer = batch_applied_but("u1", lambda contacts: {
        "contacts": [],
        "errors": [{"email": c["email"], "message": "Email is taken"}
                   for c in contacts if c["user_id"] == "u1"],
    })  # fmt: skip
    [run] = sync(workspace, engine, transport=answer)

    # Whatever was acknowledged, Gist holds (acknowledged ⊆ in Gist), for good.
    assert acked(engine) <= true_in_gist(gist), (run.delivered, acked(engine), held(gist, VIP))


# 3 ---------------------------------------------------------------------------------------
# A batch's 2xx listing only its failed contacts under ``contacts``, naming them in a form
# that matches no contact sent exactly (Gist lower-cased the email): the entry's position in
# that short list is taken for the contact's position in the request.


def test_batch_failure_entries_are_not_read_by_position_when_they_are_not_one_per_contact(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    workspace.gist_options["batch_size"] = 10
    workspace.write_config()
    source = add_audience(workspace)
    write_members(source, [(f"u{n}", f"U{n}@Example.com") for n in range(4)])

    answer = batch_applied_but("u3", lambda contacts: {"contacts": [
        {"email": "u3@example.com", "errors": [{"message": "Email is invalid"}]}
    ]})  # fmt: skip
    [run] = sync(workspace, engine, transport=answer)

    assert acked(engine) <= true_in_gist(gist), (run.delivered, acked(engine), held(gist, VIP))


# 4 ---------------------------------------------------------------------------------------
# A TLS error while reading the answer (the request was written, and applied) is taken for
# "Gist cannot be reached as configured": the update counts as refused, its uncertainty is
# taken back, though Gist applied it.


def test_a_tls_error_reading_the_answer_keeps_the_member_uncertain(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    import ssl

    source = add_audience(workspace)
    write_members(source, [1, 2])
    sync(workspace, engine)

    async def hook(inner: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/contacts" and json.loads(request.content)["user_id"] == "u1":
            await apply(inner, request)  # written and applied; the answer's record is bad
            cause = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac")
            cause.library, cause.reason = "SSL", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"  # as _ssl
            raise httpx.ReadError("bad record mac") from cause
        return await inner.handle_async_request(request)

    write_members(source, [2])  # u1 leaves
    [run] = sync(workspace, engine, transport=Hooked(hook))
    assert held(gist, VIP)["u1"] is False

    unsure = {u for (u,) in table(engine, select(uncertain_members.c.user_id))}
    assert "u1" in unsure, (run.status, run.error, unsure)


# 5 ---------------------------------------------------------------------------------------
# A batch's 2xx whose body is a JSON array of per-contact results, one of them an error:
# any body that is not an object is read as "no errors", and every contact is acknowledged.


def test_batch_answer_as_a_list_of_results_with_an_error_acknowledges_none_it_names(
    workspace: Workspace, engine: Engine, gist: FakeGist
) -> None:
    workspace.gist_options["batch_size"] = 10
    workspace.write_config()
    source = add_audience(workspace)
    write_members(source, range(4))

    answer = batch_applied_but("u3", lambda contacts: [
        {"user_id": c["user_id"], "errors": [{"message": "Email is invalid"}]}
        if c["user_id"] == "u3" else {"user_id": c["user_id"], "id": 1}
        for c in contacts
    ])  # fmt: skip
    [run] = sync(workspace, engine, transport=answer)

    assert acked(engine) <= true_in_gist(gist), (run.delivered, acked(engine), held(gist, VIP))
