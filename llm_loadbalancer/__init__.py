"""llm-loadbalancer: one ``lb:NAME`` model that spreads prompts over several models, keys
and option sets, or (``kind: embedding``) one embedding model that spreads batches over keys.

Every ``llm`` command imports this module and calls both hooks, so they stay cheap: the
modules that do the work are imported only when there are balancers to register or when
``llm lb`` itself runs.
"""

import click
import llm


@llm.hookimpl(trylast=True)
def register_models(register, model_aliases):
    from .registration import register_balancers

    register_balancers(register, model_aliases)


@llm.hookimpl
def register_embedding_models(register):
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
