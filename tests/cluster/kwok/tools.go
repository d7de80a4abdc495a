//go:build tools

// Package tools blank-imports kwok's command so that `go mod tidy` keeps its
// dependencies pinned in this module.
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
