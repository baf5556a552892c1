"""engine_core.attention"""
