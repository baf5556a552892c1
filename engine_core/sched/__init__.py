"""engine_core.sched"""
