"""Data: conversion to FFCV .beton files, loaders and batched device-side augmentation."""
from data_tools import ffcv_startup

ffcv_startup.install()
