"""engine_core.executor"""
