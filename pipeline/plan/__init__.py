"""``recipe: auto``: the planner (:mod:`pipeline.plan.planner`) and what each member costs on this machine
(:mod:`pipeline.plan.costs`)."""
