#!/bin/sh
echo "hello from the vmfarm test app"
