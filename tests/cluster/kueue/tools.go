//go:build tools

// Package tools blank-imports Kueue's manager so that `go mod tidy` keeps its
// dependencies pinned here.
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
