"""Planning a budgeted run (``make all``): budgets and their clock, stamps that let a stage be
skipped when its inputs and settings are unchanged, the throughput probe and the plan."""
