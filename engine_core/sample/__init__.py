"""engine_core.sample"""
