"""Before any stage: predict memory and time from config.json alone (:mod:`.memory`, :mod:`.model_shapes`,
:mod:`.decompose_cost` with its measured rates in ``decompose_rates.json``)."""
