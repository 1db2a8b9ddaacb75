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
