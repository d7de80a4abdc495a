//go:build tools

// Package tools blank-imports the control-plane commands built by
// kubecluster.py so that `go mod tidy` keeps their dependencies pinned here.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
