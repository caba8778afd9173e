"""llm-loadbalancer: one ``lb:NAME`` model that spreads prompts over several models, keys
and option sets, or (``kind: embedding``) one embedding model that spreads batches over keys.

Every ``llm`` command imports this module and calls both hooks, so they stay cheap: the
modules that do the work are imported only when there are balancers to register or when
``llm lb`` itself runs.
"""

import os
import sys

import click
import llm


def _nothing_to_register() -> bool:
    """True while no balancer file is saved: then a model lookup imports nothing more (without
    this check, registration.py and the modules it imports cost every process that looks up a
    model 1.7 ms, by -X importtime). Once it is imported, its own look at the folder is the
    only one."""
    if __name__ + ".registration" in sys.modules:
        return False
    try:
        with os.scandir(llm.user_dir() / "loadbalancers") as found:
            return not any(entry.name.endswith(".yaml") for entry in found)
    except OSError:  # no folder: config.entries() finds nothing either
        return True


@llm.hookimpl(trylast=True)
def register_models(register, model_aliases):
    if _nothing_to_register():
        return
    from .registration import register_balancers

    register_balancers(register, model_aliases)


@llm.hookimpl
def register_embedding_models(register):
    if _nothing_to_register():
        return
    from .registration import register_embedding_balancers

    register_embedding_balancers(register)


class _LazyGroup(click.Command):
    "``llm lb`` as ``llm --help`` lists it; the real group is built only when it runs."

    def make_context(self, info_name, args, parent=None, **extra):
        from .commands import lb

        return lb.make_context(info_name, args, parent=parent, **extra)


@llm.hookimpl
def register_commands(cli):
    cli.add_command(
        _LazyGroup(
            "lb",
            help="Manage load balancers: lb:NAME models that spread prompts over several members",
        )
    )
