//go:build tools

// Package tools blank-imports SeaweedFS's weed command so that `go mod tidy`
// keeps its dependencies pinned here.
package tools

import _ "github.com/seaweedfs/seaweedfs/weed"
