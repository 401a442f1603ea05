{{/* Full name: the release name, or <release>-kubetune. */}}
{{- define "kubetune.fullname" -}}
{{- if contains "kubetune" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-kubetune" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.labels" -}}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The namespaces the operator watches: watchNamespaces, or the release's own namespace. */}}
{{- define "kubetune.namespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- join "," .Values.watchNamespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* checkSecrets: as set, else on where the install is scoped to namespaces and off cluster-wide. */}}
{{- define "kubetune.checkSecrets" -}}
{{- if kindIs "invalid" .Values.checkSecrets -}}
{{- not .Values.clusterWide -}}
{{- else -}}
{{- .Values.checkSecrets -}}
{{- end -}}
{{- end -}}
