"""fedbot"""
