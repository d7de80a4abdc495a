{{/* Names and labels shared by every template. */}}
{{- define "kubetune.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .repository (default $.appVersion .tag) -}}
{{- end -}}

{{/* The operator's permissions come from kubetune.operator.permissions (files/rules-*.yaml). */}}
{{- define "kubetune.rules" -}}
{{ .Files.Get "files/rules-namespaced.yaml" }}
{{- end -}}

{{/* The operator's ServiceAccount as the API server names it in request.userInfo.username. */}}
{{- define "kubetune.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "kubetune.fullname" .) -}}
{{- end -}}

{{/*
The namespaces the operator watches and holds write rights in, as a JSON list: the release
namespace, then watchNamespaces. Empty with rbac.clusterWide (every namespace).
*/}}
{{- define "kubetune.watchNamespaces" -}}
{{- if .Values.rbac.clusterWide -}}
{{- if .Values.watchNamespaces -}}
{{- fail "rbac.clusterWide watches every namespace: leave watchNamespaces empty, or set rbac.clusterWide=false to watch only the release namespace and watchNamespaces" -}}
{{- end -}}
[]
{{- else -}}
{{- prepend .Values.watchNamespaces .Release.Namespace | uniq | toJson -}}
{{- end -}}
{{- end -}}
