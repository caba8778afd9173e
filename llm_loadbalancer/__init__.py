"""llm-loadbalancer: one ``lb:NAME`` model that spreads prompts over several models, keys
and option sets. Registration and commands live in their own modules, imported only when
llm calls these hooks."""

import llm


@llm.hookimpl(trylast=True)
def register_models(register, model_aliases):
    from .registration import register_balancers

    register_balancers(register, model_aliases)


@llm.hookimpl
def register_commands(cli):
    from .commands import lb

    cli.add_command(lb)
