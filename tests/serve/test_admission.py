"""Admission fair between tenants (serve/admission.py), without Ray."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from serve.admission import Admission, Overloaded


async def hold(stack: contextlib.AsyncExitStack, cm) -> None:
    await stack.enter_async_context(cm)


def test_a_lone_tenant_leaves_a_slot_for_the_next():
    async def run():
        adm = Admission(max_inflight=4, max_uploads_per_tenant=16)
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(3):
                await hold(stack, adm.slot("a"))
            with pytest.raises(Overloaded):
                await hold(stack, adm.slot("a"))
            await hold(stack, adm.slot("b"))  # the reserved slot
            assert adm.total == 4
            with pytest.raises(Overloaded):
                await hold(stack, adm.slot("c"))
        assert adm.total == 0 and not adm.inflight  # released and forgotten

    asyncio.run(run())


def test_shares_shrink_as_tenants_arrive():
    async def run():
        adm = Admission(max_inflight=6, max_uploads_per_tenant=16)
        async with contextlib.AsyncExitStack() as stack:
            await hold(stack, adm.slot("a"))
            await hold(stack, adm.slot("b"))
            assert adm.share("a") == 3  # two active tenants
            assert adm.share("c") == 2  # a third would make three

    asyncio.run(run())


def test_uploads_are_budgeted_per_tenant():
    async def run():
        adm = Admission(max_inflight=2, max_uploads_per_tenant=2)
        async with contextlib.AsyncExitStack() as stack:
            await hold(stack, adm.upload("slow"))
            await hold(stack, adm.upload("slow"))
            with pytest.raises(Overloaded):
                await hold(stack, adm.upload("slow"))
            # Uploads hold no compute slot: another tenant is admitted in full.
            await hold(stack, adm.upload("b"))
            await hold(stack, adm.slot("b"))

    asyncio.run(run())


def test_would_admit_answers_before_the_body_and_matches_slot():
    async def run():
        adm = Admission(max_inflight=3, max_uploads_per_tenant=16)
        async with contextlib.AsyncExitStack() as stack:
            assert adm.would_admit("a")
            await hold(stack, adm.slot("a"))
            await hold(stack, adm.slot("a"))
            assert not adm.would_admit("a")  # the last slot is kept for a newcomer
            assert adm.would_admit("b")
            await hold(stack, adm.slot("b"))
            assert adm.total == 3 and not adm.would_admit("c")
        assert adm.total == 0 and adm.would_admit("a")

    asyncio.run(run())


def test_a_failed_request_gives_its_slot_back():
    async def run():
        adm = Admission(max_inflight=1, max_uploads_per_tenant=16)
        with pytest.raises(RuntimeError):
            async with adm.slot("a"):
                raise RuntimeError("downstream failure")
        assert adm.total == 0 and not adm.inflight

    asyncio.run(run())
