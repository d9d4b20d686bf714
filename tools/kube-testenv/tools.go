//go:build tools

// Package tools pins the upstream commands built by scripts/build-testenv.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
